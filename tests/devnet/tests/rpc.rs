//! JSON-RPC envelope, auth and error codes.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

mod common;

use std::time::Duration;

use devnet::client::RpcClient;
use serde_json::{json, Value};

#[test]
fn cookie_auth_rejects_missing_and_wrong_credentials_and_rotates_on_restart() {
    let t = common::start();
    let url = t.node.rpc_url();
    let body = r#"{"jsonrpc":"1.0","id":1,"method":"getblockcount","params":[]}"#;

    let none = RpcClient::new(&url, None).post(body).unwrap();
    assert_eq!(none.status, 401);
    assert!(none.body.is_empty());
    let wrong = RpcClient::new(&url, Some(("__cookie__", "00")))
        .post(body)
        .unwrap();
    assert_eq!(wrong.status, 401);
    assert_eq!(t.call("getblockcount", json!([])), json!(0));

    let cookie_path = t.node.cookie_file().unwrap();
    let first = std::fs::read_to_string(&cookie_path).unwrap();
    assert!(first.starts_with("__cookie__:"));
    assert_eq!(first.trim().len(), "__cookie__:".len() + 64);

    let dir = t.dir;
    let mut node = t.node;
    node.shutdown();
    assert!(!cookie_path.exists(), "a clean shutdown removes the cookie");

    let node = devnet::Node::start(devnet::Config::new(dir.path())).unwrap();
    let second = std::fs::read_to_string(&cookie_path).unwrap();
    assert_ne!(first, second);
    let (_, old_pass) = first.trim().split_once(':').unwrap();
    let stale = RpcClient::new(&node.rpc_url(), Some(("__cookie__", old_pass)));
    assert_eq!(stale.post(body).unwrap().status, 401);
    let fresh = RpcClient::with_cookie(&node.rpc_url(), &cookie_path).unwrap();
    assert_eq!(fresh.call("getblockcount", json!([])).unwrap(), json!(0));
}

#[test]
fn user_password_auth() {
    let t = common::start_with(|c| {
        c.rpc_auth = devnet::RpcAuth::UserPass {
            user: "u".into(),
            password: "p".into(),
        };
    });
    assert!(t.node.cookie_file().is_none());
    let rpc = RpcClient::new(&t.node.rpc_url(), Some(("u", "p")));
    assert_eq!(rpc.call("getblockcount", json!([])).unwrap(), json!(0));
    let bad = RpcClient::new(&t.node.rpc_url(), Some(("u", "x")));
    assert_eq!(
        bad.post(r#"{"method":"getblockcount"}"#).unwrap().status,
        401
    );
}

#[test]
fn batch_and_versions_and_error_codes() {
    let t = common::start();
    t.mine(3);
    let batch = r#"[{"jsonrpc":"1.0","id":0,"method":"getblockhash","params":[0]},
                    {"jsonrpc":"1.0","id":1,"method":"getblockhash","params":[3]},
                    {"jsonrpc":"1.0","id":2,"method":"getblockhash","params":[4]}]"#;
    let reply = t.rpc.post(batch).unwrap();
    assert_eq!(reply.status, 200);
    let v = reply.json().unwrap();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(
        items[0]["result"],
        json!("0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206")
    );
    assert_eq!(items[1]["id"], json!(1));
    assert_eq!(items[2]["error"]["code"], json!(-8));
    assert_eq!(
        items[2]["error"]["message"],
        json!("Block height out of range")
    );

    // 1.0 errors come with HTTP 500 (404 for an unknown method), 2.0 with 200.
    let r = t
        .rpc
        .post(r#"{"jsonrpc":"1.0","id":7,"method":"getblockhash","params":[99]}"#)
        .unwrap();
    assert_eq!(r.status, 500);
    let v = r.json().unwrap();
    assert_eq!(v["error"]["code"], json!(-8));
    assert_eq!(v["result"], Value::Null);
    assert_eq!(v["id"], json!(7));
    let r = t
        .rpc
        .post(r#"{"jsonrpc":"2.0","id":8,"method":"getblockhash","params":[99]}"#)
        .unwrap();
    assert_eq!(r.status, 200);
    let v = r.json().unwrap();
    assert_eq!(v["error"]["code"], json!(-8));
    assert!(v.get("result").is_none());
    let r = t
        .rpc
        .post(r#"{"jsonrpc":"2.0","id":9,"method":"getblockcount","params":[]}"#)
        .unwrap();
    let v = r.json().unwrap();
    assert_eq!(v["result"], json!(3));
    assert!(v.get("error").is_none());
    let r = t
        .rpc
        .post(r#"{"jsonrpc":"1.0","id":1,"method":"nosuchmethod","params":[]}"#)
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json().unwrap()["error"]["code"], json!(-32601));

    let zeros = "00".repeat(32);
    assert_eq!(
        t.call_err("getblockheader", json!([zeros])),
        (-5, "Block not found".into())
    );
    assert_eq!(t.call_err("getblock", json!([zeros])).0, -5);
    assert_eq!(t.call_err("getblockheader", json!(["abc"])).0, -8);
    assert_eq!(
        t.call_err("getmempoolentry", json!([zeros])),
        (-5, "Transaction not in mempool".into())
    );
    assert_eq!(
        t.call_err("generatetoaddress", json!([1, "notanaddress"]))
            .0,
        -5
    );
    assert_eq!(t.call_err("sendrawtransaction", json!(["00"])).0, -22);
    let est = t.call("estimatesmartfee", json!([6]));
    assert_eq!(
        est,
        json!({"errors": ["Insufficient data or no feerate found"], "blocks": 6})
    );
    t.call("devnet_setfeeestimate", json!([0.0002]));
    let est = t.call("estimatesmartfee", json!([6]));
    assert_eq!(est["feerate"], json!(0.0002));
    let info = t.call("getblockchaininfo", json!([]));
    assert_eq!(info["chain"], json!("regtest"));
    assert_eq!(info["blocks"], json!(3));
    assert_eq!(info["initialblockdownload"], json!(false));
}

#[test]
fn warmup_answers_minus_28_then_works() {
    let t = common::start_with(|c| c.warmup = Duration::from_millis(1500));
    assert_eq!(
        t.call_err("getblockcount", json!([])),
        (-28, "Loading block index…".into())
    );
    let rest = RpcClient::new(&t.node.rest_url(), None)
        .get("/rest/chaininfo.json")
        .unwrap();
    assert_eq!(rest.status, 503);
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(t.call("getblockcount", json!([])), json!(0));
}

#[test]
fn stop_rpc_stops_the_node() {
    let t = common::start();
    let mut stopped = t.node.stop_requested();
    assert_eq!(t.call("stop", json!([])), json!("Bitcoin Core stopping"));
    assert!(*stopped.borrow_and_update());
}
