//! `orchestrator run` with a fault injected, for the crash tests:
//! `orchestrator-crash-at BOUNDARY run FLAGS...` takes the flags `orchestrator run` takes
//! and dies (abort, as kill -9 would) when a saga reaches the step boundary named
//! BOUNDARY (the embedded engine), or with `activity:TYPE` once an activity of that type
//! has done its work, before its answer reaches the Temporal server. With
//! `CRASH_ONCE_FILE` set, only the first process to get there (of any number sharing the
//! file) dies. Built only here: the production binary has no such hook.

use std::sync::Arc;

use clap::Parser;
use orchestrator::app::{self, Hooks};
use orchestrator::cli::{Cli, Command};
use orchestrator::executor::{Boundaries, Boundary};
use orchestrator::saga::Withdrawal;

/// Dies at the named step boundary.
struct CrashAt(String);

impl Boundaries for CrashAt {
    fn reached(&self, at: Boundary, _: &Withdrawal) {
        if at.name() == self.0 {
            eprintln!("crash injected at {}: dying here", self.0);
            std::process::abort();
        }
    }
}

/// Dies after the named activity did its work.
struct CrashAfter(String);

impl orchestrator::temporal::worker::ActivityHook for CrashAfter {
    fn finished(&self, activity_type: &str) {
        if activity_type != self.0 {
            return;
        }
        if let Some(once) = std::env::var_os("CRASH_ONCE_FILE") {
            // Created by the first to get here only.
            let first = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(once)
                .is_ok();
            if !first {
                return;
            }
        }
        eprintln!("crash injected after activity {}: dying here", self.0);
        std::process::abort();
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: orchestrator-crash-at BOUNDARY run [FLAGS...]");
        std::process::exit(2);
    }
    let at = args.remove(1);
    let Command::Run(run) = Cli::parse_from(args).command else {
        eprintln!("only `run` takes a crash point");
        std::process::exit(2);
    };
    service::logs::init(run.log_format, "ORCHESTRATOR_LOG");
    let hooks = match at.strip_prefix("activity:") {
        Some(activity) => Hooks {
            activities: Some(Arc::new(CrashAfter(activity.to_owned()))),
            ..Hooks::default()
        },
        None => Hooks {
            boundaries: Some(Arc::new(CrashAt(at))),
            ..Hooks::default()
        },
    };
    let outcome = match run.config() {
        Ok(config) => app::run(config, hooks, app::terminated()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = outcome {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
