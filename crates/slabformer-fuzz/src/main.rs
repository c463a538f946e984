//! `slabformer-fuzz <target> --execs N --seed S`: mutation fuzzing of one reader (see the crate
//! docs and docs/reliability.md). Exit status 0: no input failed; 1: a failure (its seed and the
//! reproducing command are printed); 3: a hang (the watchdog); an abort: the allocation bound.

use std::process::ExitCode;

use slabformer_fuzz::{ALLOC_BOUND, TIME_BOUND, Target, replay_input, run};

const USAGE: &str = "usage: slabformer-fuzz <model-file|pth|config|idx|image|all> [--execs N] [--seed S] [--keep-going]
       slabformer-fuzz <target> --replay INPUT_SEED [--save FILE]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let number = |flag: &str, default: u64| match value(flag) {
        Some(v) => v.replace('_', "").parse::<f64>().ok().map(|f| f as u64),
        None => Some(default),
    };
    let (Some(execs), Some(seed)) = (number("--execs", 100_000), number("--seed", 0)) else {
        eprintln!("--execs and --seed take numbers\n{USAGE}");
        return ExitCode::from(2);
    };
    let targets: Vec<Target> = match (name.as_str(), Target::from_name(name)) {
        ("all", _) => Target::ALL.to_vec(),
        (_, Some(t)) => vec![t],
        _ => {
            eprintln!("unknown target `{name}`\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(input) = value("--replay") {
        let Ok(input_seed) = input.parse::<u64>() else {
            eprintln!("--replay takes an input seed");
            return ExitCode::from(2);
        };
        let target = targets[0];
        let bytes = replay_input(target, input_seed);
        if let Some(file) = value("--save") {
            std::fs::write(&file, &bytes).expect("write the input");
            println!("wrote {} bytes to {file}", bytes.len());
        }
        // Unguarded: a panic prints its backtrace (RUST_BACKTRACE=1).
        println!("{}", match target.exec(&bytes) {
            Ok(()) => "accepted".to_string(),
            Err(e) => format!("refused: {e}"),
        });
        return ExitCode::SUCCESS;
    }
    let keep_going = args.iter().any(|a| a == "--keep-going");
    println!(
        "bounds: {} s per input, {} MiB of live heap per input",
        TIME_BOUND.as_secs(),
        ALLOC_BOUND >> 20
    );
    let mut failed = false;
    for target in targets {
        let report = run(target, execs, seed, keep_going, |r| {
            eprint!("\r{}: {} execs, {:.0}/s, {} accepted, {} distinct errors   ", target.name(), r.execs, r.execs_per_second(), r.accepted, r.distinct_errors);
        });
        eprintln!();
        println!(
            "{}: {} execs in {:.1} s ({:.0} exec/s), {} accepted, {} distinct errors, slowest input {:.3} s, peak heap per input {:.1} MiB, {} failure(s)",
            target.name(),
            report.execs,
            report.seconds,
            report.execs_per_second(),
            report.accepted,
            report.distinct_errors,
            report.slowest,
            report.peak_bytes as f64 / (1 << 20) as f64,
            report.failures.len()
        );
        for f in &report.failures {
            println!("FAIL {f}");
        }
        failed |= !report.failures.is_empty();
    }
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}
