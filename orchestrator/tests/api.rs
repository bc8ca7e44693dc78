//! `orchestrator.v1.Withdrawals` over real gRPC on 127.0.0.1 with a real saga database:
//! submissions are validated and idempotent, every call needs the token, a watcher sees
//! each change the saga records, and cancelling works only before broadcast.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bitcoin::hashes::Hash;
use bitcoin::{Amount, Network, OutPoint, Txid};
use orchestrator::grpc::WithdrawalService;
use orchestrator::saga::{Attempt, Coin, Outcome};
use orchestrator::store::SagaStore;
use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::withdrawals_client::WithdrawalsClient;
use service::auth::BearerToken;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

const TOKEN: &str = "orchestrator-test-token";
const DEST: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";

struct Api {
    store: Arc<SagaStore>,
    client: WithdrawalsClient<Channel>,
    _dir: tempfile::TempDir,
}

async fn start() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SagaStore::open(dir.path()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = WithdrawalService::new(store.clone(), Network::Regtest)
        .into_server(BearerToken::new(TOKEN));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Api {
        store,
        client: WithdrawalsClient::new(channel),
        _dir: dir,
    }
}

fn auth<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let value = MetadataValue::try_from(format!("Bearer {TOKEN}")).unwrap();
    req.metadata_mut().insert("authorization", value);
    req
}

fn submit(request_id: &str, destination: &str, amount_sat: u64) -> pb::SubmitWithdrawalRequest {
    pb::SubmitWithdrawalRequest {
        request_id: request_id.into(),
        wallet: "hot".into(),
        destination: destination.into(),
        amount_sat,
        fee_rate: Some(pb::submit_withdrawal_request::FeeRate::TargetBlocks(6)),
        max_fee_sat: 20_000,
    }
}

/// The next change a watcher sees.
async fn next(s: &mut tonic::Streaming<pb::Withdrawal>) -> pb::Withdrawal {
    let wait = std::time::Duration::from_secs(10);
    tokio::time::timeout(wait, s.message())
        .await
        .expect("a change within 10 s")
        .unwrap()
        .unwrap()
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    r.unwrap_err().code()
}

#[tokio::test]
async fn submissions_are_validated_idempotent_and_need_the_token() {
    let mut api = start().await;
    let first = api
        .client
        .submit_withdrawal(auth(submit("pay-1", DEST, 50_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.state, pb::WithdrawalState::Received as i32);
    assert_eq!(
        (first.amount_sat, first.request_id.as_str()),
        (50_000, "pay-1")
    );
    // The same request again: the same withdrawal, nothing new.
    let again = api
        .client
        .submit_withdrawal(auth(submit("pay-1", DEST, 50_000)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, first.id);
    // The same id for another payment.
    let c = api
        .client
        .submit_withdrawal(auth(submit("pay-1", DEST, 50_001)))
        .await;
    assert_eq!(code(c), tonic::Code::AlreadyExists);

    let mainnet = "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq";
    for (req, why) in [
        (submit("bad-1", "not-an-address", 50_000), "garbage address"),
        (submit("bad-2", mainnet, 50_000), "another network"),
        (submit("bad-3", DEST, 0), "zero"),
        (submit("bad-4", DEST, 100), "dust"),
        (submit("", DEST, 50_000), "no request id"),
        (
            pb::SubmitWithdrawalRequest {
                fee_rate: None,
                ..submit("bad-5", DEST, 50_000)
            },
            "no fee rate",
        ),
        (
            pb::SubmitWithdrawalRequest {
                max_fee_sat: 0,
                ..submit("bad-6", DEST, 50_000)
            },
            "no fee cap",
        ),
        (
            pb::SubmitWithdrawalRequest {
                fee_rate: Some(pb::submit_withdrawal_request::FeeRate::SatPerVb(f64::NAN)),
                ..submit("bad-7", DEST, 50_000)
            },
            "NaN rate",
        ),
        (
            pb::SubmitWithdrawalRequest {
                fee_rate: Some(pb::submit_withdrawal_request::FeeRate::Priority(
                    pb::Priority::Unspecified.into(),
                )),
                ..submit("bad-8", DEST, 50_000)
            },
            "no priority",
        ),
        (
            pb::SubmitWithdrawalRequest {
                fee_rate: Some(pb::submit_withdrawal_request::FeeRate::Priority(9)),
                ..submit("bad-9", DEST, 50_000)
            },
            "unknown priority",
        ),
    ] {
        let r = api.client.submit_withdrawal(auth(req)).await;
        assert_eq!(code(r), tonic::Code::InvalidArgument, "{why}");
    }
    // A megabyte in any string field: refused, and not echoed back.
    let huge = "w".repeat(1 << 20);
    for (req, why) in [
        (
            pb::SubmitWithdrawalRequest {
                wallet: huge.clone(),
                ..submit("huge-1", DEST, 50_000)
            },
            "wallet",
        ),
        (
            pb::SubmitWithdrawalRequest {
                wallet: "hot wallet".into(),
                ..submit("huge-2", DEST, 50_000)
            },
            "wallet name",
        ),
        (
            pb::SubmitWithdrawalRequest {
                destination: huge.clone(),
                ..submit("huge-3", DEST, 50_000)
            },
            "destination",
        ),
        (submit(&huge, DEST, 50_000), "request id"),
    ] {
        let status = api.client.submit_withdrawal(auth(req)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{why}");
        assert!(
            status.message().len() < 200,
            "{why}: {}",
            status.message().len()
        );
    }
    let status = api
        .client
        .get_withdrawal(auth(pb::GetWithdrawalRequest {
            key: Some(pb::get_withdrawal_request::Key::RequestId(huge.clone())),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().len() < 200);
    // Without the token: refused, nothing created.
    let anonymous = api
        .client
        .submit_withdrawal(tonic::Request::new(submit("anon", DEST, 50_000)))
        .await;
    assert_eq!(code(anonymous), tonic::Code::Unauthenticated);
    let get = api
        .client
        .get_withdrawal(tonic::Request::new(pb::GetWithdrawalRequest {
            key: Some(pb::get_withdrawal_request::Key::Id(first.id)),
        }))
        .await;
    assert_eq!(code(get), tonic::Code::Unauthenticated);
    let all = api
        .client
        .list_withdrawals(auth(pb::ListWithdrawalsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.withdrawals.len(), 1, "only pay-1 exists");
    let by_request = api
        .client
        .get_withdrawal(auth(pb::GetWithdrawalRequest {
            key: Some(pb::get_withdrawal_request::Key::RequestId("pay-1".into())),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_request.id, first.id);
    let missing = api
        .client
        .get_withdrawal(auth(pb::GetWithdrawalRequest {
            key: Some(pb::get_withdrawal_request::Key::Id(999)),
        }))
        .await;
    assert_eq!(code(missing), tonic::Code::NotFound);
}

#[tokio::test]
async fn watchers_see_every_change_and_cancel_stops_at_broadcast() {
    let mut api = start().await;
    let submitted = api
        .client
        .submit_withdrawal(auth(submit("w-1", DEST, 60_000)))
        .await
        .unwrap()
        .into_inner();
    let mut stream = api
        .client
        .watch_withdrawal(auth(pb::WatchWithdrawalRequest { id: submitted.id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next(&mut stream).await.state,
        pb::WithdrawalState::Received as i32
    );

    // What the executor will do, recorded through the store.
    let w = api.store.get(submitted.id).unwrap().unwrap();
    let coin = Coin {
        outpoint: OutPoint::new(Txid::from_byte_array([3; 32]), 1),
        value: Amount::from_sat(100_000),
        script: bitcoin::ScriptBuf::new(),
    };
    let w = api
        .store
        .record(&w, Outcome::Reserved(vec![coin]), 10)
        .unwrap();
    assert_eq!(
        next(&mut stream).await.state,
        pb::WithdrawalState::Reserved as i32
    );
    let attempt = Attempt {
        txid: Txid::from_byte_array([4; 32]),
        raw: vec![0; 10],
        fee: Amount::from_sat(500),
        fee_rate: 3.5,
        fee_choice: String::new(),
    };
    let w = api.store.record(&w, Outcome::Signed(attempt), 11).unwrap();
    let signed = next(&mut stream).await;
    assert_eq!(signed.state, pb::WithdrawalState::Signed as i32);
    assert_eq!((signed.fee_sat, signed.txids.len()), (500, 1));
    let w = api.store.record(&w, Outcome::Sending, 12).unwrap();
    let _ = next(&mut stream).await;
    api.store
        .record(&w, Outcome::Broadcast { height: 120 }, 12)
        .unwrap();
    assert_eq!(
        next(&mut stream).await.state,
        pb::WithdrawalState::Broadcast as i32
    );

    // Broadcast: too late to cancel.
    let late = api
        .client
        .cancel_withdrawal(auth(pb::CancelWithdrawalRequest { id: submitted.id }))
        .await;
    assert_eq!(code(late), tonic::Code::FailedPrecondition);

    // Another one, cancelled while reserved: its coin is released.
    let other = api
        .client
        .submit_withdrawal(auth(submit("w-2", DEST, 70_000)))
        .await
        .unwrap()
        .into_inner();
    let o = api.store.get(other.id).unwrap().unwrap();
    let coin2 = Coin {
        outpoint: OutPoint::new(Txid::from_byte_array([5; 32]), 0),
        value: Amount::from_sat(100_000),
        script: bitcoin::ScriptBuf::new(),
    };
    api.store
        .record(&o, Outcome::Reserved(vec![coin2.clone()]), 20)
        .unwrap();
    assert!(api.store.reserved().unwrap().contains(&coin2.outpoint));
    let cancelled = api
        .client
        .cancel_withdrawal(auth(pb::CancelWithdrawalRequest { id: other.id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, pb::WithdrawalState::Cancelled as i32);
    assert!(!api.store.reserved().unwrap().contains(&coin2.outpoint));

    let page = api
        .client
        .list_withdrawals(auth(pb::ListWithdrawalsRequest {
            state: pb::WithdrawalState::Cancelled as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.withdrawals.len(), 1);
    assert_eq!(page.withdrawals[0].id, other.id);
    let bad_token = api
        .client
        .list_withdrawals(auth(pb::ListWithdrawalsRequest {
            page_token: "x".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(code(bad_token), tonic::Code::InvalidArgument);
    // The largest token is past every id: an empty page, not an overflow.
    let past_the_end = api
        .client
        .list_withdrawals(auth(pb::ListWithdrawalsRequest {
            page_token: u64::MAX.to_string(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(past_the_end.withdrawals.is_empty());
}
