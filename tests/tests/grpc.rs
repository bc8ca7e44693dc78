//! The gRPC API through a generated tonic client, against a real server on 127.0.0.1.
//!
//! Scenarios:
//! 1. mainnet 0..599 indexed (`../shared/fixtures`); the server binds port 0 first, then
//!    serves: GetTip, GetBalance per wallet equal the reference model; ListUtxos pages
//!    return every UTXO once; GetTransfer and ListTransfers agree; health reports SERVING.
//!    Subscribe replays the event log in order and resumes from an offset.
//! 2. without the bearer token, or with another: UNAUTHENTICATED; health stays open.
//! 3. bad requests get the right status and the server keeps answering: no target,
//!    unknown wallet, wrong-network address, bad page token, bad txid, unknown txid.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use bitcoin::Network;
use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;
use service::auth::BearerToken;
use system_tests::fixtures::{fixture, read_blk_blocks};
use system_tests::harness::{all_scripts, open_with_wallets, rescan, wallets_over};
use system_tests::reference;
use tonic::Code;

const TOKEN: &str = "test-token-0123456789";

fn code<T>(r: Result<T, tonic::Status>) -> (Code, String) {
    let s = r.err().expect("an error status");
    (s.code(), s.message().to_string())
}

fn wallet(name: &str) -> Option<pb::Target> {
    Some(pb::Target {
        target: Some(pb::target::Target::Wallet(name.into())),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_over_grpc_match_the_model_and_bad_requests_get_clear_statuses() {
    let dir = fixture("mainnet-0-599/blk00000.dat")
        .parent()
        .unwrap()
        .to_owned();
    let mut chain = read_blk_blocks(&dir.join("blk00000.dat"));
    chain.extend(read_blk_blocks(&dir.join("blk00001.dat")));
    let wallets = wallets_over(&chain, 41);
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), Network::Bitcoin, &wallets);
    rescan(&store, Network::Bitcoin, &dir, None, None, None).unwrap();
    let model = reference::compute(&chain, 0, &all_scripts(&wallets));

    let log_len = indexer::query::Query::new(&store, Network::Bitcoin)
        .unwrap()
        .events(0, usize::MAX)
        .unwrap()
        .len() as u64;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut opts = indexer::grpc::ServeOptions::new(Network::Bitcoin);
    opts.access.token = Some(BearerToken::new(TOKEN));
    let server = tokio::spawn(indexer::grpc::serve(
        Arc::new(store),
        listener,
        opts,
        async {
            let _ = stopped.await;
        },
    ));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let with = |token: &'static str| {
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            Ok(req)
        }
    };
    // Without the token, or with another one: UNAUTHENTICATED.
    let (c, _) = code(
        IndexerClient::new(channel.clone())
            .get_tip(pb::GetTipRequest {})
            .await,
    );
    assert_eq!(c, Code::Unauthenticated);
    let (c, _) = code(
        IndexerClient::with_interceptor(channel.clone(), with("wrong-token-0123456789"))
            .get_tip(pb::GetTipRequest {})
            .await,
    );
    assert_eq!(c, Code::Unauthenticated);
    let mut client = IndexerClient::with_interceptor(channel, with(TOKEN));

    let tip = client
        .get_tip(pb::GetTipRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tip.height, 599);
    assert_eq!(tip.hash, chain[599].block_hash().to_string());

    for w in &wallets {
        let b = client
            .get_balance(pb::GetBalanceRequest {
                target: wallet(&w.name),
                min_conf: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (b.confirmed_sat, b.immature_sat, b.utxo_count),
            model.balance(&w.scripts),
            "{}",
            w.name
        );
        assert_eq!((b.height, b.tip_hash.as_str()), (599, tip.hash.as_str()));

        let mut seen = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_utxos(pb::ListUtxosRequest {
                    target: wallet(&w.name),
                    min_conf: 0,
                    limit: 9,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.utxos.len() <= 9);
            seen.extend(page.utxos.iter().map(|u| format!("{}:{}", u.txid, u.vout)));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let unique: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "a utxo listed twice");
        let expected: BTreeSet<String> = model
            .utxos
            .iter()
            .filter(|(_, u)| w.scripts.contains(&u.script))
            .map(|(op, _)| op.to_string())
            .collect();
        assert_eq!(unique, expected);

        let history = client
            .list_transfers(pb::ListTransfersRequest {
                wallet: w.name.clone(),
                from_height: 0,
                to_height: 0,
                limit: 1000,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!history.transfers.is_empty());
        let first = &history.transfers[0];
        let again = client
            .get_transfer(pb::GetTransferRequest {
                txid: first.txid.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&again.transfers[0], first);
        assert_eq!(first.confirmations, 600 - first.height);
    }

    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "indexer.v1.Indexer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Server reflection lists the service, as grpcurl's `list` would ask.
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"indexer.v1.Indexer".to_string()),
        "{names:?}"
    );

    let (c, m) = code(
        client
            .get_balance(pb::GetBalanceRequest {
                target: None,
                min_conf: 0,
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    let (c, m) = code(
        client
            .get_balance(pb::GetBalanceRequest {
                target: wallet("nobody"),
                min_conf: 0,
            })
            .await,
    );
    assert_eq!((c, m.contains("nobody")), (Code::NotFound, true), "{m}");
    let testnet = Some(pb::Target {
        target: Some(pb::target::Target::Address(
            "tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx".into(),
        )),
    });
    let (c, m) = code(
        client
            .get_balance(pb::GetBalanceRequest {
                target: testnet,
                min_conf: 0,
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("not a bitcoin address"), "{m}");
    let (c, _) = code(
        client
            .list_utxos(pb::ListUtxosRequest {
                target: wallet("hot"),
                min_conf: 0,
                limit: u32::MAX,
                page_token: "zz".into(),
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    let (c, _) = code(
        client
            .get_transfer(pb::GetTransferRequest {
                txid: "not hex".into(),
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    let (c, _) = code(
        client
            .get_transfer(pb::GetTransferRequest {
                txid: "00".repeat(32),
            })
            .await,
    );
    assert_eq!(c, Code::NotFound);
    // A megabyte in any string field: refused, and not echoed back.
    let huge = "a".repeat(1 << 20);
    let refusals = [
        code(
            client
                .get_balance(pb::GetBalanceRequest {
                    target: wallet(&huge),
                    min_conf: 0,
                })
                .await,
        ),
        code(
            client
                .get_balance(pb::GetBalanceRequest {
                    target: Some(pb::Target {
                        target: Some(pb::target::Target::Address(huge.clone())),
                    }),
                    min_conf: 0,
                })
                .await,
        ),
        code(
            client
                .get_transfer(pb::GetTransferRequest { txid: huge.clone() })
                .await,
        ),
        code(
            client
                .list_transfers(pb::ListTransfersRequest {
                    wallet: huge.clone(),
                    ..Default::default()
                })
                .await,
        ),
        code(
            client
                .list_utxos(pb::ListUtxosRequest {
                    target: wallet("hot"),
                    min_conf: 0,
                    limit: 10,
                    page_token: huge.clone(),
                })
                .await,
        ),
        code(
            client
                .subscribe(pb::SubscribeRequest {
                    from_offset: 0,
                    log_id: huge.clone(),
                })
                .await,
        ),
    ];
    for (c, m) in refusals {
        assert_eq!(c, Code::InvalidArgument, "{}", &m[..m.len().min(100)]);
        assert!(m.len() < 200, "{} bytes echoed", m.len());
    }
    // Subscribe: the whole log in order, then a resume from the middle, then a bad offset.
    let mut events = client
        .subscribe(pb::SubscribeRequest {
            from_offset: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for expected in 0..log_len {
        let e = events.message().await.unwrap().expect("an event");
        assert_eq!(e.offset, expected);
        if expected == 0 {
            assert_eq!(
                (e.kind, e.height),
                (pb::EventKind::BlockConnected as i32, 0)
            );
        }
    }
    drop(events);
    let mut resumed = client
        .subscribe(pb::SubscribeRequest {
            from_offset: 123,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.message().await.unwrap().unwrap().offset, 123);
    drop(resumed);
    let (c, m) = code(
        client
            .subscribe(pb::SubscribeRequest {
                from_offset: log_len + 5,
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    // An offset of another log (a rebuilt index) is refused; one of this log is served.
    let log_id = client
        .get_tip(pb::GetTipRequest {})
        .await
        .unwrap()
        .into_inner()
        .log_id;
    assert_eq!(log_id.len(), 32, "{log_id}");
    let (c, m) = code(
        client
            .subscribe(pb::SubscribeRequest {
                from_offset: 0,
                log_id: "0".repeat(32),
            })
            .await,
    );
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("rebuilt"), "{m}");
    let mut same = client
        .subscribe(pb::SubscribeRequest {
            from_offset: 0,
            log_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.message().await.unwrap().unwrap().offset, 0);
    drop(same);

    // Still serving after all of that.
    assert_eq!(
        client
            .get_tip(pb::GetTipRequest {})
            .await
            .unwrap()
            .into_inner()
            .height,
        599
    );

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
