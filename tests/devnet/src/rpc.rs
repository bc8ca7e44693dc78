//! JSON-RPC: request envelopes (1.0, 2.0, batches) and the methods.

use std::str::FromStr;

use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::{Address, Amount, BlockHash, Network, Transaction, Txid};
use serde_json::{json, Value};

use crate::json::{block_json, btc, header_json, parse_btc, tx_json};
use crate::node::Shared;
use crate::validation::{Policy, Reject};
use crate::wallet::AddrKind;
use crate::zmqpub::ZmqFaults;

/// Core's default `maxfeerate` for sendrawtransaction: 0.10 BTC/kvB, in sat/kvB.
const DEFAULT_MAX_FEE_RATE: u64 = 10_000_000;

/// A JSON-RPC error object.
#[derive(Debug, Clone)]
pub(crate) struct RpcError {
    code: i32,
    message: String,
}

impl RpcError {
    fn new(code: i32, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    fn invalid_param(message: impl Into<String>) -> RpcError {
        RpcError::new(-8, message)
    }
}

impl From<Reject> for RpcError {
    fn from(r: Reject) -> RpcError {
        RpcError::new(r.code, r.message)
    }
}

type RpcResult = Result<Value, RpcError>;

/// Answers one HTTP body: returns the HTTP status and the JSON reply.
pub(crate) fn handle_body(shared: &Shared, body: &[u8]) -> (u16, Value) {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(requests)) => {
            let replies = requests.iter().map(|r| handle_one(shared, r).1).collect();
            (200, Value::Array(replies))
        }
        Ok(request @ Value::Object(_)) => handle_one(shared, &request),
        Ok(_) => (
            500,
            legacy_error(
                Value::Null,
                &RpcError::new(-32700, "Top-level object parse error"),
            ),
        ),
        Err(_) => (
            500,
            legacy_error(Value::Null, &RpcError::new(-32700, "Parse error")),
        ),
    }
}

fn legacy_error(id: Value, e: &RpcError) -> Value {
    json!({"result": null, "error": {"code": e.code, "message": e.message}, "id": id})
}

fn handle_one(shared: &Shared, request: &Value) -> (u16, Value) {
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let v2 = request.get("jsonrpc").and_then(Value::as_str) == Some("2.0");
    let result = parse_and_call(shared, request);
    match (v2, result) {
        (true, Ok(r)) => (200, json!({"jsonrpc": "2.0", "result": r, "id": id})),
        (true, Err(e)) => (
            200,
            json!({"jsonrpc": "2.0", "error": {"code": e.code, "message": e.message}, "id": id}),
        ),
        (false, Ok(r)) => (200, json!({"result": r, "error": null, "id": id})),
        (false, Err(e)) => {
            let status = match e.code {
                -32600 => 400,
                -32601 => 404,
                _ => 500,
            };
            (status, legacy_error(id, &e))
        }
    }
}

fn parse_and_call(shared: &Shared, request: &Value) -> RpcResult {
    if !request.is_object() {
        return Err(RpcError::new(-32600, "Invalid Request object"));
    }
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::new(-32600, "Method must be a string"))?;
    let params = match request.get("params") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(p)) => p.clone(),
        Some(Value::Object(_)) => {
            return Err(RpcError::invalid_param(
                "devnet supports positional parameters only",
            ))
        }
        Some(_) => return Err(RpcError::new(-32600, "Params must be an array or object")),
    };
    if shared.warming_up() && method != "stop" {
        return Err(RpcError::new(-28, "Loading block index…"));
    }
    call(shared, method, &params)
}

fn opt(params: &[Value], i: usize) -> Option<&Value> {
    params.get(i).filter(|v| !v.is_null())
}

fn required<'a>(params: &'a [Value], i: usize, name: &str) -> Result<&'a Value, RpcError> {
    opt(params, i).ok_or_else(|| RpcError::new(-1, format!("missing required argument '{name}'")))
}

fn type_error(v: &Value, expected: &str) -> RpcError {
    let actual = match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    RpcError::new(
        -3,
        format!("JSON value of type {actual} is not of expected type {expected}"),
    )
}

fn as_str(v: &Value) -> Result<&str, RpcError> {
    v.as_str().ok_or_else(|| type_error(v, "string"))
}

fn as_u64(v: &Value) -> Result<u64, RpcError> {
    v.as_u64().ok_or_else(|| type_error(v, "number"))
}

fn as_i64(v: &Value) -> Result<i64, RpcError> {
    v.as_i64().ok_or_else(|| type_error(v, "number"))
}

/// Core's hash argument checks and messages.
fn parse_hash<T: FromStr>(v: &Value, name: &str) -> Result<T, RpcError> {
    let s = as_str(v)?;
    if s.len() != 64 {
        return Err(RpcError::invalid_param(format!(
            "{name} must be of length 64 (not {}, for '{s}')",
            s.len()
        )));
    }
    s.parse::<T>().map_err(|_| {
        RpcError::invalid_param(format!("{name} must be hexadecimal string (not '{s}')"))
    })
}

/// `verbose` arguments accept booleans and (in newer Core) numbers.
fn verbosity(v: Option<&Value>, default: u64) -> Result<u64, RpcError> {
    match v {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(u64::from(*b)),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| type_error(v.unwrap_or(&Value::Null), "number")),
        Some(other) => Err(type_error(other, "bool")),
    }
}

fn parse_address(v: &Value) -> Result<Address, RpcError> {
    let s = as_str(v)?;
    Address::from_str(s)
        .ok()
        .and_then(|a| a.require_network(Network::Regtest).ok())
        .ok_or_else(|| RpcError::new(-5, "Invalid address"))
}

fn decode_tx(v: &Value) -> Result<Transaction, RpcError> {
    let hex = as_str(v)?;
    deserialize_hex::<Transaction>(hex).map_err(|_| {
        RpcError::new(
            -22,
            "TX decode failed. Make sure the tx has at least one input.",
        )
    })
}

/// sat/kvB from a BTC/kvB argument.
fn fee_rate_arg(v: Option<&Value>, default: u64) -> Result<u64, RpcError> {
    match v {
        None => Ok(default),
        Some(v) => parse_btc(v)
            .map(|a| a.to_sat())
            .ok_or_else(|| RpcError::new(-3, "Amount out of range")),
    }
}

fn call(shared: &Shared, method: &str, p: &[Value]) -> RpcResult {
    {
        let mut state = shared.state();
        if let Some(fault) = state.rpc_faults.get_mut(method) {
            if fault.count > 0 {
                fault.count -= 1;
                return Err(RpcError::new(fault.code, fault.message.clone()));
            }
        }
    }
    match method {
        "getblockchaininfo" => Ok(blockchain_info(shared)),
        "getbestblockhash" => Ok(json!(shared.state().chain.tip().hash.to_string())),
        "getblockcount" => Ok(json!(shared.state().chain.height())),
        "getblockhash" => {
            let h = as_i64(required(p, 0, "height")?)?;
            let state = shared.state();
            u32::try_from(h)
                .ok()
                .and_then(|h| state.chain.at_height(h))
                .map(|e| json!(e.hash.to_string()))
                .ok_or_else(|| RpcError::invalid_param("Block height out of range"))
        }
        "getblockheader" => {
            let hash: BlockHash = parse_hash(required(p, 0, "blockhash")?, "blockhash")?;
            let verbose = verbosity(opt(p, 1), 1)? > 0;
            let state = shared.state();
            let entry = state
                .chain
                .entry(&hash)
                .ok_or_else(|| RpcError::new(-5, "Block not found"))?;
            Ok(if verbose {
                header_json(&state.chain, entry)
            } else {
                json!(serialize_hex(&entry.block.header))
            })
        }
        "getblock" => {
            let hash: BlockHash = parse_hash(required(p, 0, "blockhash")?, "blockhash")?;
            let level = verbosity(opt(p, 1), 1)?;
            let state = shared.state();
            let entry = state
                .chain
                .entry(&hash)
                .ok_or_else(|| RpcError::new(-5, "Block not found"))?;
            Ok(if level == 0 {
                json!(serialize_hex(&*entry.block))
            } else {
                block_json(&state.chain, entry, level)
            })
        }
        "getrawtransaction" => get_raw_transaction(shared, p),
        "decoderawtransaction" => Ok(tx_json(&decode_tx(required(p, 0, "hexstring")?)?)),
        "sendrawtransaction" => {
            let tx = decode_tx(required(p, 0, "hexstring")?)?;
            let max_fee_rate = fee_rate_arg(opt(p, 1), DEFAULT_MAX_FEE_RATE)?;
            let txid = tx.compute_txid();
            let mut state = shared.state();
            if state.mempool.contains(&txid) {
                return Ok(json!(txid.to_string()));
            }
            let policy = Policy {
                bypass_fees: false,
                check_scripts: true,
                max_fee_rate: Some(max_fee_rate),
            };
            state.accept(tx, &policy, false)?;
            Ok(json!(txid.to_string()))
        }
        "testmempoolaccept" => test_mempool_accept(shared, p),
        "getrawmempool" => {
            let verbose = verbosity(opt(p, 0), 0)? > 0;
            let state = shared.state();
            let entries = state.mempool.sorted();
            Ok(if verbose {
                let map: serde_json::Map<String, Value> = entries
                    .iter()
                    .map(|e| (e.txid.to_string(), mempool_entry_json(&state, &e.txid)))
                    .collect();
                Value::Object(map)
            } else {
                Value::Array(entries.iter().map(|e| json!(e.txid.to_string())).collect())
            })
        }
        "getmempoolentry" => {
            let txid: Txid = parse_hash(required(p, 0, "txid")?, "txid")?;
            let state = shared.state();
            if !state.mempool.contains(&txid) {
                return Err(RpcError::new(-5, "Transaction not in mempool"));
            }
            Ok(mempool_entry_json(&state, &txid))
        }
        "getmempoolinfo" => {
            let state = shared.state();
            Ok(json!({
                "loaded": true,
                "size": state.mempool.len(),
                "bytes": state.mempool.bytes(),
                "usage": state.mempool.bytes() * 4,
                "total_fee": btc(state.mempool.total_fee()),
                "maxmempool": 300_000_000,
                "mempoolminfee": 0.00001,
                "minrelaytxfee": 0.00001,
                "incrementalrelayfee": 0.00001,
                "unbroadcastcount": 0,
                "fullrbf": true,
            }))
        }
        "estimatesmartfee" => {
            let target = as_u64(required(p, 0, "conf_target")?)?;
            if !(1..=1008).contains(&target) {
                return Err(RpcError::invalid_param(
                    "Invalid conf_target, must be between 1 and 1008",
                ));
            }
            let state = shared.state();
            Ok(match state.fee_estimate {
                Some(rate) => json!({"feerate": btc(rate), "blocks": target.max(2)}),
                None => {
                    json!({"errors": ["Insufficient data or no feerate found"], "blocks": target})
                }
            })
        }
        "generatetoaddress" => {
            let n = as_u64(required(p, 0, "nblocks")?)?;
            let address = parse_address(required(p, 1, "address")?)
                .map_err(|_| RpcError::new(-5, "Error: Invalid address"))?;
            let mut state = shared.state();
            let hashes = state
                .mine(n as u32, &address.script_pubkey())
                .map_err(|e| RpcError::new(-1, e.to_string()))?;
            Ok(Value::Array(
                hashes.iter().map(|h| json!(h.to_string())).collect(),
            ))
        }
        "invalidateblock" | "reconsiderblock" => {
            let hash: BlockHash = parse_hash(required(p, 0, "blockhash")?, "blockhash")?;
            let mut state = shared.state();
            let result = if method == "invalidateblock" {
                state.chain.invalidate(&hash)
            } else {
                state.chain.reconsider(&hash)
            };
            let events = result
                .map_err(|m| RpcError::new(if m == "Block not found" { -5 } else { -8 }, m))?;
            state.apply_tip_events(events);
            Ok(Value::Null)
        }
        "getnewaddress" => {
            let kind = match opt(p, 1) {
                None => AddrKind::Bech32,
                Some(v) => {
                    let name = as_str(v)?;
                    AddrKind::from_name(name).ok_or_else(|| {
                        RpcError::new(-5, format!("Unknown address type '{name}'"))
                    })?
                }
            };
            let mut state = shared.state();
            let address = state
                .wallet
                .new_address(kind)
                .map_err(|e| RpcError::new(-4, e.to_string()))?;
            Ok(json!(address.to_string()))
        }
        "sendtoaddress" => {
            let address = parse_address(required(p, 0, "address")?)?;
            let amount = parse_btc(required(p, 1, "amount")?)
                .filter(|a| *a > Amount::ZERO)
                .ok_or_else(|| RpcError::new(-3, "Invalid amount for send"))?;
            let subtract_fee = opt(p, 4).and_then(Value::as_bool).unwrap_or(false);
            let mut state = shared.state();
            let txid = state
                .send_to(&address.script_pubkey(), amount, subtract_fee)
                .map_err(|(code, m)| RpcError::new(code, m))?;
            Ok(json!(txid.to_string()))
        }
        "getbalance" => Ok(btc(shared.state().balance())),
        "getzmqnotifications" => Ok(Value::Array(
            shared
                .zmq_endpoints
                .iter()
                .map(
                    |(t, e)| json!({"type": format!("pub{}", t.name()), "address": e, "hwm": 1000}),
                )
                .collect(),
        )),
        "getnetworkinfo" => Ok(json!({
            "version": 280000,
            "subversion": "/Satoshi:28.0.0(devnet)/",
            "protocolversion": 70016,
            "localservices": "0000000000000c09",
            "localrelay": true,
            "networkactive": true,
            "connections": 0,
            "relayfee": 0.00001,
            "incrementalfee": 0.00001,
            "warnings": [],
        })),
        "uptime" => Ok(json!(shared.started.elapsed().as_secs())),
        "stop" => {
            shared.request_stop();
            Ok(json!("Bitcoin Core stopping"))
        }
        "devnet_setfeeestimate" => {
            let rate = match opt(p, 0) {
                None => None,
                Some(v) => Some(parse_btc(v).ok_or_else(|| RpcError::new(-3, "Invalid fee rate"))?),
            };
            shared.state().fee_estimate = rate;
            Ok(Value::Null)
        }
        "devnet_setminingfeerate" => {
            let rate = as_u64(required(p, 0, "sat_per_vb")?)?;
            shared.state().mining_fee_rate = rate;
            Ok(Value::Null)
        }
        "devnet_setfiller" => {
            let n = as_u64(required(p, 0, "count")?)?;
            shared.state().fillers = n as usize;
            Ok(Value::Null)
        }
        "devnet_zmqfaults" => {
            let faults: ZmqFaults = match opt(p, 0) {
                None => ZmqFaults::default(),
                Some(v) => serde_json::from_value(v.clone())
                    .map_err(|e| RpcError::invalid_param(e.to_string()))?,
            };
            shared.state().zmq.set_faults(faults);
            Ok(Value::Null)
        }
        "devnet_rpcfault" => {
            let method = as_str(required(p, 0, "method")?)?.to_owned();
            let fault: crate::node::RpcFault =
                serde_json::from_value(required(p, 1, "fault")?.clone())
                    .map_err(|e| RpcError::invalid_param(e.to_string()))?;
            shared.state().rpc_faults.insert(method, fault);
            Ok(Value::Null)
        }
        "devnet_rpcfaults" => {
            let state = shared.state();
            Ok(state
                .rpc_faults
                .iter()
                .map(|(m, f)| {
                    (
                        m.clone(),
                        json!({"code": f.code, "message": f.message, "count": f.count}),
                    )
                })
                .collect::<serde_json::Map<String, Value>>()
                .into())
        }
        "devnet_setrest" => {
            let on = required(p, 0, "enabled")?
                .as_bool()
                .ok_or_else(|| RpcError::invalid_param("enabled must be a boolean"))?;
            shared.state().rest = on;
            Ok(Value::Null)
        }
        "devnet_evict" => {
            let txid: Txid = parse_hash(required(p, 0, "txid")?, "txid")?;
            if shared.state().evict(&txid) {
                Ok(Value::Null)
            } else {
                Err(RpcError::new(-5, "Transaction not in mempool"))
            }
        }
        _ => Err(RpcError::new(-32601, "Method not found")),
    }
}

fn blockchain_info(shared: &Shared) -> Value {
    let state = shared.state();
    let chain = &state.chain;
    let tip = chain.tip();
    json!({
        "chain": "regtest",
        "blocks": chain.height(),
        "headers": chain.best_header_height().max(chain.height()),
        "bestblockhash": tip.hash.to_string(),
        "difficulty": tip.block.header.difficulty_float(),
        "time": tip.block.header.time,
        "mediantime": chain.median_time_past(&tip.hash),
        "verificationprogress": 1,
        "initialblockdownload": false,
        "chainwork": bitcoin::hex::DisplayHex::to_lower_hex_string(&tip.chainwork.to_be_bytes()[..]),
        "size_on_disk": state.size_on_disk(),
        "pruned": false,
        "warnings": [],
    })
}

/// Used by REST `chaininfo.json` too.
pub(crate) fn chain_info(shared: &Shared) -> Value {
    blockchain_info(shared)
}

fn get_raw_transaction(shared: &Shared, p: &[Value]) -> RpcResult {
    let txid: Txid = parse_hash(required(p, 0, "txid")?, "txid")?;
    let verbose = verbosity(opt(p, 1), 0)? > 0;
    let state = shared.state();
    if let Some(e) = state.mempool.get(&txid) {
        return Ok(if verbose {
            tx_json(&e.tx)
        } else {
            json!(serialize_hex(&*e.tx))
        });
    }
    let (hash, pos) = state.chain.tx_location(&txid).ok_or_else(|| {
        RpcError::new(
            -5,
            "No such mempool or blockchain transaction. Use gettransaction for wallet transactions.",
        )
    })?;
    let entry = state
        .chain
        .entry(&hash)
        .ok_or_else(|| RpcError::new(-5, "Block not found"))?;
    let tx = &entry.block.txdata[pos];
    if !verbose {
        return Ok(json!(serialize_hex(tx)));
    }
    let mut v = tx_json(tx);
    v["blockhash"] = json!(hash.to_string());
    v["confirmations"] = json!(state.chain.height() - entry.height + 1);
    v["time"] = json!(entry.block.header.time);
    v["blocktime"] = json!(entry.block.header.time);
    Ok(v)
}

fn test_mempool_accept(shared: &Shared, p: &[Value]) -> RpcResult {
    let raw = required(p, 0, "rawtxs")?;
    let hexes = raw.as_array().ok_or_else(|| type_error(raw, "array"))?;
    let max_fee_rate = fee_rate_arg(opt(p, 1), DEFAULT_MAX_FEE_RATE)?;
    let mut results = Vec::new();
    let mut state = shared.state();
    for hex in hexes {
        let tx = decode_tx(hex)?;
        let txid = tx.compute_txid();
        let wtxid = tx.compute_wtxid();
        let mut item = json!({"txid": txid.to_string(), "wtxid": wtxid.to_string()});
        if state.mempool.contains(&txid) {
            item["allowed"] = json!(false);
            item["reject-reason"] = json!("txn-already-in-mempool");
            results.push(item);
            continue;
        }
        let policy = Policy {
            bypass_fees: false,
            check_scripts: true,
            max_fee_rate: Some(max_fee_rate),
        };
        match state.accept(tx, &policy, true) {
            Ok(c) => {
                item["allowed"] = json!(true);
                item["vsize"] = json!(c.vsize);
                item["fees"] = json!({
                    "base": btc(c.fee),
                    "effective-feerate": btc(Amount::from_sat(c.fee.to_sat() * 1000 / c.vsize.max(1))),
                    "effective-includes": [wtxid.to_string()],
                });
            }
            Err(r) => {
                item["allowed"] = json!(false);
                item["reject-reason"] = json!(r.reason);
            }
        }
        results.push(item);
    }
    Ok(Value::Array(results))
}

fn mempool_entry_json(state: &crate::node::State, txid: &Txid) -> Value {
    let pool = &state.mempool;
    let Some(e) = pool.get(txid) else {
        return Value::Null;
    };
    let ancestors = pool.ancestors(txid);
    let descendants = pool.descendants(txid);
    let sum = |set: &std::collections::HashSet<Txid>| {
        set.iter()
            .filter_map(|t| pool.get(t))
            .fold((Amount::ZERO, 0u64), |(f, s), x| (f + x.fee, s + x.vsize))
    };
    let (anc_fee, anc_size) = sum(&ancestors);
    let (desc_fee, desc_size) = sum(&descendants);
    json!({
        "vsize": e.vsize,
        "weight": e.weight,
        "time": e.time,
        "height": e.height,
        "descendantcount": descendants.len() + 1,
        "descendantsize": desc_size + e.vsize,
        "ancestorcount": ancestors.len() + 1,
        "ancestorsize": anc_size + e.vsize,
        "wtxid": e.tx.compute_wtxid().to_string(),
        "fees": {
            "base": btc(e.fee),
            "modified": btc(e.fee),
            "ancestor": btc(anc_fee + e.fee),
            "descendant": btc(desc_fee + e.fee),
        },
        "depends": pool.parents(&e.tx).iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        "spentby": pool.children(txid).iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        "bip125-replaceable": pool.bip125_replaceable(txid),
        "unbroadcast": false,
    })
}
