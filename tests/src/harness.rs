//! Running the real indexer (RocksDB in a temp dir, the real pipeline) and comparing what
//! it stored with the reference model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bitcoin::{Block, Network, OutPoint, ScriptBuf};
use indexer::pipeline::{PipelineOptions, WriteOptions};
use indexer::rescan::{self, RescanError, RescanReport, RescanRequest};
use indexer::store::{Profile, Reader, Store};
use indexer::types::ScriptId;
use indexer::wallets;
use rand::{Rng, SeedableRng};

use crate::reference::Model;

/// A wallet for the tests: a name and the scripts it watches.
#[derive(Clone, Debug)]
pub struct TestWallet {
    /// Name.
    pub name: String,
    /// Scripts, added as `raw()` descriptors.
    pub scripts: BTreeSet<ScriptBuf>,
}

/// Wallets over `chain`: every script whose output is ever spent (so spends are tested),
/// plus a random third of the rest, split over three wallets that overlap.
pub fn wallets_over(chain: &[Block], seed: u64) -> Vec<TestWallet> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut outputs: BTreeMap<OutPoint, ScriptBuf> = BTreeMap::new();
    let mut spent_scripts = BTreeSet::new();
    let mut others = BTreeSet::new();
    for block in chain {
        for tx in &block.txdata {
            for input in &tx.input {
                if let Some(s) = outputs.get(&input.previous_output) {
                    spent_scripts.insert(s.clone());
                }
            }
            let txid = tx.compute_txid();
            for (vout, out) in tx.output.iter().enumerate() {
                outputs.insert(OutPoint::new(txid, vout as u32), out.script_pubkey.clone());
                if rng.gen_bool(0.33) {
                    others.insert(out.script_pubkey.clone());
                }
            }
        }
    }
    deal(
        spent_scripts.into_iter().chain(others),
        &["hot", "cold", "deposits"],
        7,
    )
}

/// Every script any of `wallets` watches.
pub fn all_scripts(wallets: &[TestWallet]) -> BTreeSet<ScriptBuf> {
    wallets
        .iter()
        .flat_map(|w| w.scripts.iter().cloned())
        .collect()
}

/// Deals `scripts` round-robin into wallets called `names`; every `overlap_every`th script
/// also goes to the next wallet, so some scripts belong to two wallets.
pub fn deal(
    scripts: impl IntoIterator<Item = ScriptBuf>,
    names: &[&str],
    overlap_every: usize,
) -> Vec<TestWallet> {
    let mut wallets: Vec<TestWallet> = names
        .iter()
        .map(|n| TestWallet {
            name: n.to_string(),
            scripts: BTreeSet::new(),
        })
        .collect();
    let n = wallets.len();
    for (i, s) in scripts.into_iter().enumerate() {
        if i % overlap_every == 0 {
            wallets[(i + 1) % n].scripts.insert(s.clone());
        }
        wallets[i % n].scripts.insert(s);
    }
    wallets
}

/// A fresh database in `dir` with `wallets` watched.
pub fn open_with_wallets(dir: &Path, network: Network, wallets: &[TestWallet]) -> Store {
    open_with_wallets_as(dir, network, wallets, Profile::Serving)
}

/// [`open_with_wallets`] opened as `profile`.
pub fn open_with_wallets_as(
    dir: &Path,
    network: Network,
    wallets: &[TestWallet],
    profile: Profile,
) -> Store {
    let store = Store::open_as(dir, network, profile).expect("open store");
    for w in wallets {
        let descriptors: Vec<String> = w
            .scripts
            .iter()
            .map(|s| format!("raw({})", s.to_hex_string()))
            .collect();
        if !descriptors.is_empty() {
            wallets::add(&store, network, &w.name, &descriptors, None, 20).expect("add wallet");
        }
    }
    store
}

/// Rescans `blocks_dir` into `store` with the real pipeline.
pub fn rescan(
    store: &Store,
    network: Network,
    blocks_dir: &Path,
    from: Option<u32>,
    to: Option<u32>,
    undo_depth: Option<u32>,
) -> Result<RescanReport, RescanError> {
    let filter = wallets::load_filter(store, 100_000, 1e-4).expect("load filter");
    let opts = PipelineOptions {
        // Small chunks and groups so multi-chunk and multi-batch paths run on small chains.
        chunk_bytes: 64 << 10,
        write: WriteOptions {
            max_blocks: 17,
            undo_depth,
            ..WriteOptions::default()
        },
    };
    let req = RescanRequest {
        blocks_dir: blocks_dir.to_owned(),
        from,
        to,
    };
    rescan::rescan_blocks_dir(store, network, &filter, &req, &opts, &|_| {}, &|_| {})
}

/// Asserts that the store holds exactly the model's UTXOs and balances, per script and
/// per wallet.
pub fn assert_store_matches(store: &Store, model: &Model, wallets: &[TestWallet]) {
    let stored = store.utxos().expect("read utxos");
    assert_eq!(stored.len(), model.utxos.len(), "number of watched utxos");
    for (op, u) in &stored {
        let m = model
            .utxos
            .get(op)
            .unwrap_or_else(|| panic!("stored utxo {op} not in the model"));
        assert_eq!(
            (u.value, &u.script, u.height, u.coinbase),
            (m.value, &m.script, m.height, m.coinbase),
            "utxo {op}"
        );
    }
    let tip = store.tip().expect("tip").expect("indexed something");
    assert_eq!(tip.0, model.tip, "tip height");
    let all: BTreeSet<ScriptBuf> = wallets
        .iter()
        .flat_map(|w| w.scripts.iter().cloned())
        .collect();
    for script in &all {
        let b = store
            .script_balance(&ScriptId::of(script))
            .expect("script balance");
        let one = BTreeSet::from([script.clone()]);
        assert_eq!(
            (b.confirmed, b.immature, b.utxo_count),
            model.balance(&one),
            "balance of script {script}"
        );
    }
    for w in wallets {
        let id = store
            .wallet_id(&w.name)
            .expect("wallet id")
            .expect("wallet exists");
        let b = store.wallet_balance(id).expect("wallet balance");
        assert_eq!(
            (b.confirmed, b.immature, b.utxo_count),
            model.balance(&w.scripts),
            "balance of wallet {}",
            w.name
        );
    }
}

/// Writes a secret (a token, a password) as its owner alone may read it: mode 600, as the
/// binaries require of secret files.
pub fn write_secret(path: impl AsRef<Path>, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = path.as_ref();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The output script of regtest address `address`.
pub fn script_of(address: &str) -> ScriptBuf {
    address
        .parse::<bitcoin::Address<_>>()
        .unwrap()
        .require_network(Network::Regtest)
        .unwrap()
        .script_pubkey()
}

/// A binary of this workspace, built beside the running test (`target/<profile>/<name>`):
/// tests of this crate run another package's binaries, which `CARGO_BIN_EXE_*` does not name.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{name} is not built in {}: build with `cargo build --workspace --all-targets` \
         (scripts/test.sh does)",
        dir.display()
    );
    bin
}

/// The regtest extended private key of master seed `[seed; 32]`: a test's signer.
pub fn xpriv(seed: u8) -> bitcoin::bip32::Xpriv {
    bitcoin::bip32::Xpriv::new_master(Network::Regtest, &[seed; 32]).expect("a valid seed")
}

/// Its extended public key.
pub fn xpub(seed: u8) -> bitcoin::bip32::Xpub {
    bitcoin::bip32::Xpub::from_priv(&bitcoin::secp256k1::Secp256k1::new(), &xpriv(seed))
}

/// Polls saga `id` in `store` until `ok` holds of it (panics with where it stuck after
/// `timeout`).
pub fn wait_for_saga(
    store: &orchestrator::store::SagaStore,
    id: u64,
    timeout: std::time::Duration,
    ok: impl Fn(&orchestrator::saga::Withdrawal) -> bool,
) -> orchestrator::saga::Withdrawal {
    let started = std::time::Instant::now();
    loop {
        let w = store
            .get(id)
            .expect("the saga database reads")
            .expect("the saga exists");
        if ok(&w) {
            return w;
        }
        assert!(started.elapsed() < timeout, "stuck at {w:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
