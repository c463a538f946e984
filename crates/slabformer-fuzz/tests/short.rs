//! The short fuzz run of CI: every target a few thousand inputs (seconds), with the bounds of
//! the long runs. One test, targets in turn: the allocation bound is process-wide.

use slabformer_fuzz::{Target, run};

#[test]
fn every_reader_survives_a_short_fuzz_run() {
    let execs: u64 = std::env::var("SLABFORMER_FUZZ_EXECS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let mut failures = Vec::new();
    for target in Target::ALL {
        let report = run(target, execs, 0x5EED, true, |_| {});
        eprintln!("{}: {} execs, {:.0}/s, {} accepted, {} distinct errors", target.name(), report.execs, report.execs_per_second(), report.accepted, report.distinct_errors);
        assert_eq!(report.execs, execs);
        // Inputs that reach past the first checks: the mutations are not all refused at the magic.
        assert!(report.distinct_errors >= 5, "{}: only {} distinct errors", target.name(), report.distinct_errors);
        failures.extend(report.failures.iter().map(|f| f.to_string()));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_seed_file_is_accepted() {
    for target in Target::ALL {
        for (i, seed) in target.seeds().iter().enumerate() {
            assert_eq!(target.exec(seed), Ok(()), "{} seed {i}", target.name());
        }
    }
}
