//! `indexer serve` over TLS (rustls) as an operator configures it: a certificate and key
//! from PEM files, optionally a client CA for mutual TLS. A TLS client that trusts the CA
//! gets answers; a plaintext client, a client trusting another CA, and (with mutual TLS) a
//! client without a certificate get none.

#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const BIN: &str = env!("CARGO_BIN_EXE_indexer");

/// A CA and certificates it signed, as PEM.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca.pem(),
        server: leaf(vec!["localhost".into()]),
        client: leaf(vec!["ops-client".into()]),
    }
}

/// `indexer serve` on an ephemeral loopback port, killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, pki: &Pki, mutual: bool) -> Server {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let db = dir.join("db");
    let common = ["--db", db.to_str().unwrap(), "--network", "regtest"];
    let added = Command::new(BIN)
        .args(common)
        .args(["watch", "add", "--wallet", "hot"])
        .arg("addr(bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080)")
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let mut cmd = Command::new(BIN);
    cmd.args(common)
        .args(["serve", "--grpc", "127.0.0.1:0"])
        .args(["--grpc-tls-cert-file", &write("server.pem", &pki.server.0)])
        .args(["--grpc-tls-key-file", &write("server.key", &pki.server.1)]);
    if mutual {
        cmd.args(["--grpc-tls-client-ca-file", &write("ca.pem", &pki.ca)]);
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening\t")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Server { child, addr }
}

/// Asks for wallet `hot`'s balance over `channel`.
async fn balance(channel: Channel) -> Result<pb::GetBalanceResponse, tonic::Status> {
    IndexerClient::new(channel)
        .get_balance(pb::GetBalanceRequest {
            target: Some(pb::Target {
                target: Some(pb::target::Target::Wallet("hot".into())),
            }),
            min_conf: 0,
        })
        .await
        .map(|r| r.into_inner())
}

/// Connects with TLS trusting `ca`, presenting `identity` when given.
async fn tls_channel(
    addr: &str,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test]
async fn serves_over_tls_and_refuses_plaintext_and_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let server = serve(dir.path(), &pki, false);

    let channel = tls_channel(&server.addr, &pki.ca, None).await.unwrap();
    let b = balance(channel).await.unwrap();
    assert_eq!((b.confirmed_sat, b.utxo_count), (0, 0));

    // Plaintext HTTP/2 to a TLS port: no answer.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(balance(plain).await.is_err());
    }
    // A client that trusts another CA refuses the server's certificate.
    let other = self::pki();
    let stranger = tls_channel(&server.addr, &other.ca, None).await;
    if let Ok(stranger) = stranger {
        assert!(balance(stranger).await.is_err());
    }
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let server = serve(dir.path(), &pki, true);

    let with_cert = tls_channel(&server.addr, &pki.ca, Some(&pki.client))
        .await
        .unwrap();
    assert!(balance(with_cert).await.is_ok());

    let without = tls_channel(&server.addr, &pki.ca, None).await;
    if let Ok(without) = without {
        assert!(balance(without).await.is_err());
    }
    // A certificate signed by another CA is refused too.
    let other = self::pki();
    let forged = tls_channel(&server.addr, &pki.ca, Some(&other.client)).await;
    if let Ok(forged) = forged {
        assert!(balance(forged).await.is_err());
    }
}

#[test]
fn a_certificate_without_its_key_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("server.pem");
    std::fs::write(&pem, pki().server.0).unwrap();
    let out = Command::new(BIN)
        .args(["--db", dir.path().join("db").to_str().unwrap()])
        .args(["--network", "regtest", "serve", "--grpc", "127.0.0.1:0"])
        .args(["--grpc-tls-cert-file", pem.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("grpc_tls_key_file"), "{stderr}");
}
