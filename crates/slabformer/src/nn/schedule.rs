//! The PRepBN mixing schedule λ: closed form over training-mode calls, shared by the layer (which
//! evaluates it from its counters) and by training logs.

use serde::{Deserialize, Serialize};

/// How λ falls from `r0` to 0 over the decay phase.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Decay {
    /// λ = r0·(T − t)/T, the official schedule.
    #[default]
    Linear,
    /// λ = r0·½(1 + cos(π·t/T)).
    Cosine,
    /// A staircase of `drops` equal steps: λ = r0·(1 − ⌊drops·t/T⌋/drops); one drop is "LN until
    /// T, then RepBN".
    Step { drops: u32 },
}

impl Decay {
    /// λ after `elapsed` decay calls out of `total` (both ≥ 0, `total` > 0), in f32 as the
    /// official code computes it (`r0 * iter / total_step` on float32 tensors).
    pub fn lambda(self, r0: f64, remaining: i64, total: i64) -> f32 {
        debug_assert!(total > 0);
        let remaining = remaining.clamp(0, total);
        let r0 = r0 as f32;
        match self {
            Decay::Linear => r0 * remaining as f32 / total as f32,
            Decay::Cosine => {
                let elapsed = (total - remaining) as f64 / total as f64;
                r0 * (0.5 * (1.0 + (std::f64::consts::PI * elapsed).cos())) as f32
            }
            Decay::Step { drops } => {
                let drops = i64::from(drops.max(1));
                let done = (drops * (total - remaining)) / total;
                r0 * (1.0 - done as f32 / drops as f32)
            }
        }
    }
}

/// λ as a function of the training-mode call index of one PRepBN layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrepbnSchedule {
    /// Pure-LN calls before the decay starts (`warm`).
    pub warm: u64,
    /// Decay calls T (`total_step`); 0 means pure RepBN from the start.
    pub total: u64,
    pub r0: f64,
    pub decay: Decay,
}

/// What one training-mode call computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    /// LayerNorm only; the RepBN branch is not run, so its statistics stay put.
    Warm,
    /// λ·LN + (1−λ)·RepBN, both branches run.
    Mix(f32),
    /// RepBN only (T = 0).
    RepBn,
}

impl Phase {
    /// What a `LinearNorm` with these counters computes on its next training-mode call, as the
    /// official layer decides it: `warm` first, then λ = decay(r0, iter, total).
    pub fn of_counters(warm: i64, iter: i64, total: i64, r0: f64, decay: Decay) -> Phase {
        if warm > 0 {
            Phase::Warm
        } else if total <= 0 {
            Phase::RepBn
        } else {
            Phase::Mix(decay.lambda(r0, iter, total))
        }
    }

    /// The weight of the LayerNorm branch.
    pub fn lambda(self) -> f32 {
        match self {
            Phase::Warm => 1.0,
            Phase::Mix(l) => l,
            Phase::RepBn => 0.0,
        }
    }
}

impl PrepbnSchedule {
    /// The phase of training-mode call `call` (0-based), as the layer's counters would give it.
    pub fn phase(&self, call: u64) -> Phase {
        if self.total == 0 {
            return Phase::RepBn;
        }
        if call < self.warm {
            return Phase::Warm;
        }
        let elapsed = (call - self.warm).min(self.total);
        let remaining = (self.total - elapsed) as i64;
        Phase::Mix(self.decay.lambda(self.r0, remaining, self.total as i64))
    }

    /// λ of call `call` (1.0 during warm-up).
    pub fn lambda(&self, call: u64) -> f32 {
        self.phase(call).lambda()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linear(warm: u64, total: u64) -> PrepbnSchedule {
        PrepbnSchedule {
            warm,
            total,
            r0: 1.0,
            decay: Decay::Linear,
        }
    }

    #[test]
    fn linear_schedule_matches_spec_boundaries() {
        // SPEC §7.1 item 5.
        let s = linear(0, 10);
        let got: Vec<f32> = (0..13).map(|k| s.lambda(k)).collect();
        let want = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{got:?}");
        }
        let s = linear(3, 4);
        let phases: Vec<Phase> = (0..10).map(|k| s.phase(k)).collect();
        assert_eq!(&phases[..3], &[Phase::Warm; 3]);
        let mixes: Vec<f32> = phases[3..].iter().map(|p| p.lambda()).collect();
        assert_eq!(mixes, vec![1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn zero_total_is_pure_repbn_not_nan() {
        let s = linear(0, 0);
        assert_eq!(s.phase(0), Phase::RepBn);
        assert_eq!(s.lambda(5), 0.0);
    }

    #[test]
    fn cosine_and_step_hit_their_ends() {
        let cos = PrepbnSchedule {
            decay: Decay::Cosine,
            ..linear(0, 100)
        };
        assert_eq!(cos.lambda(0), 1.0);
        assert!((cos.lambda(50) - 0.5).abs() < 1e-6);
        assert!(cos.lambda(100).abs() < 1e-7);
        assert!(cos.lambda(30) > cos.lambda(31));
        let step = PrepbnSchedule {
            decay: Decay::Step { drops: 1 },
            ..linear(0, 100)
        };
        assert_eq!(step.lambda(99), 1.0);
        assert_eq!(step.lambda(100), 0.0);
        let stairs = PrepbnSchedule {
            decay: Decay::Step { drops: 4 },
            ..linear(0, 100)
        };
        assert_eq!(
            [0, 24, 25, 50, 75, 100].map(|k| stairs.lambda(k)),
            [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
        );
    }

    #[test]
    fn r0_scales_the_start() {
        let s = PrepbnSchedule { r0: 0.5, ..linear(0, 4) };
        assert_eq!(s.lambda(0), 0.5);
        assert_eq!(s.lambda(2), 0.25);
    }
}
