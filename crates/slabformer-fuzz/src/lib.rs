//! Mutation fuzzing of slabformer's readers on stable Rust: no libFuzzer, no nightly.
//!
//! Each target starts from valid files (written by slabformer itself, or by hand for the .pth
//! forms), mutates them with a seeded generator (bit flips, byte insert/delete, truncation,
//! splicing of two seeds, integer-field edits at header offsets and in decimal numbers) and
//! feeds the result to the reader a user's file goes through. An input fails when the reader
//! panics (caught, reported with the input's seed), runs past the per-input time bound (a
//! watchdog reports the seed and exits), or asks for more heap than the allocation bound (the
//! counting allocator below refuses the request and reports the seed before the process aborts).
//! Every input is a function of `(run seed, exec index)`, so one seed reproduces it:
//! `slabformer-fuzz <target> --replay <input seed>`.

pub mod alloc;
pub mod mutate;
pub mod pickle;
pub mod targets;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use targets::Target;

/// Live heap one input may hold at once, above what the process held before it.
pub const ALLOC_BOUND: usize = 512 << 20;
/// Wall time one input may take (release build; wall time on a shared machine, hence the
/// margin: the slowest inputs take about 0.1 s alone).
pub const TIME_BOUND: Duration = Duration::from_secs(10);

/// The seed of the input under test (reported by the allocator and the watchdog).
pub static CURRENT_INPUT: AtomicU64 = AtomicU64::new(0);
/// Milliseconds since [`epoch`] at which the current input started; 0 between inputs.
static INPUT_STARTED_MS: AtomicU64 = AtomicU64::new(0);
/// The last panic's message and place, captured by the hook instead of printed.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The seed of input `index` of a run seeded `seed` (SplitMix64).
pub fn input_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A failing input.
#[derive(Debug, Clone)]
pub struct Failure {
    pub target: Target,
    pub input_seed: u64,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} input {}: {} (reproduce: slabformer-fuzz {} --replay {})", self.target.name(), self.input_seed, self.message, self.target.name(), self.input_seed)
    }
}

/// What a run saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub execs: u64,
    /// Inputs the reader accepted (the rest were refused with an error, as they should be).
    pub accepted: u64,
    /// Distinct error messages (first 96 characters): a rough measure of how many paths the
    /// inputs reached.
    pub distinct_errors: usize,
    pub seconds: f64,
    /// The slowest input, in seconds.
    pub slowest: f64,
    /// The most heap one input held at once above the baseline, in bytes.
    pub peak_bytes: usize,
    pub failures: Vec<Failure>,
}

impl Report {
    pub fn execs_per_second(&self) -> f64 {
        self.execs as f64 / self.seconds.max(1e-9)
    }
}

/// Silences the default panic output (fuzzing panics by the thousand when a defect is hit) and
/// keeps the message for the report; starts the hang watchdog once.
pub fn install_guards() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            let text = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            *LAST_PANIC.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("panicked{place}: {text}"));
        }));
        let _ = epoch();
        std::thread::Builder::new()
            .name("fuzz-watchdog".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_millis(100));
                    let started = INPUT_STARTED_MS.load(Ordering::SeqCst);
                    let now = epoch().elapsed().as_millis() as u64;
                    if started != 0 && now.saturating_sub(started) > TIME_BOUND.as_millis() as u64 {
                        eprintln!(
                            "slabformer-fuzz: input {} ran past the {} s time bound (a hang); reproduce with --replay {}",
                            CURRENT_INPUT.load(Ordering::SeqCst),
                            TIME_BOUND.as_secs(),
                            CURRENT_INPUT.load(Ordering::SeqCst)
                        );
                        std::process::exit(3);
                    }
                }
            })
            .expect("spawn the watchdog");
    });
}

/// Runs one input under the guards: `Ok(accepted)` or the failure's message.
fn exec_guarded(target: Target, input: &[u8], seed: u64) -> (std::result::Result<Option<String>, String>, f64, usize) {
    CURRENT_INPUT.store(seed, Ordering::SeqCst);
    let baseline = alloc::start_input(ALLOC_BOUND);
    INPUT_STARTED_MS.store((epoch().elapsed().as_millis() as u64).max(1), Ordering::SeqCst);
    let started = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| target.exec(input)));
    let seconds = started.elapsed().as_secs_f64();
    INPUT_STARTED_MS.store(0, Ordering::SeqCst);
    let peak = alloc::end_input(baseline);
    let outcome = match outcome {
        Ok(result) => Ok(result.err()),
        Err(_) => Err(LAST_PANIC.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_else(|| "panicked".into())),
    };
    (outcome, seconds, peak)
}

/// `execs` inputs of `target` from run seed `seed`; stops at the first failure unless
/// `keep_going`. `progress` is called about every second with the report so far.
pub fn run(target: Target, execs: u64, seed: u64, keep_going: bool, mut progress: impl FnMut(&Report)) -> Report {
    install_guards();
    let corpus = target.seeds();
    let mut report = Report::default();
    let mut errors = std::collections::HashSet::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    for index in 0..execs {
        let seed_of_input = input_seed(seed, index);
        let input = target.generate(seed_of_input, &corpus);
        let (outcome, seconds, peak) = exec_guarded(target, &input, seed_of_input);
        report.execs += 1;
        report.slowest = report.slowest.max(seconds);
        report.peak_bytes = report.peak_bytes.max(peak);
        match outcome {
            Ok(None) => report.accepted += 1,
            Ok(Some(error)) => {
                if errors.len() < 100_000 {
                    errors.insert(error.chars().take(96).collect::<String>());
                }
            }
            Err(message) => {
                report.failures.push(Failure { target, input_seed: seed_of_input, message });
                if !keep_going {
                    break;
                }
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            report.seconds = started.elapsed().as_secs_f64();
            report.distinct_errors = errors.len();
            progress(&report);
            last_progress = Instant::now();
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.distinct_errors = errors.len();
    report
}

/// Input `input_seed` of `target`, regenerated (what `--replay` runs).
pub fn replay_input(target: Target, input_seed: u64) -> Vec<u8> {
    target.generate(input_seed, &target.seeds())
}
