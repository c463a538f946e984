//! What a run records: `metrics.csv` (one row per optimizer step and per evaluation) and
//! `training.png` (loss, accuracy, learning rate and λ over steps).

use std::path::Path;

use plotters::prelude::*;

use crate::files::{write_atomic, write_atomic_with};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepRow {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub lambda: Option<f64>,
    pub grad_norm: f64,
    pub images_per_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalRow {
    pub step: u64,
    pub epoch: u64,
    /// `model`, `ema`, `fused`, or `recalibrated`.
    pub model: String,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
}

/// The rows of a run. A training run appends each row to `metrics.csv` as it is recorded
/// ([`open_log`](Self::open_log), [`record_step`](Self::record_step)), and syncs the file before
/// each checkpoint, so the rows up to a checkpoint are on disk before the checkpoint is; resume
/// truncates them to the checkpoint ([`truncate_after`](Self::truncate_after)) and goes on.
#[derive(Debug, Default)]
pub struct Metrics {
    pub steps: Vec<StepRow>,
    pub evals: Vec<EvalRow>,
    log: Option<std::fs::File>,
}

impl Clone for Metrics {
    /// The rows; the copy appends nowhere.
    fn clone(&self) -> Self {
        Self { steps: self.steps.clone(), evals: self.evals.clone(), log: None }
    }
}

const HEADER: &str = "kind,step,epoch,model,loss,lr,lambda,grad_norm,images_per_s,top1,top5";

fn step_line(r: &StepRow) -> String {
    let lambda = r.lambda.map(|l| format!("{l:.6}")).unwrap_or_default();
    format!("step,{},{},,{:.6},{:.6e},{lambda},{:.4},{:.1},,\n", r.step, r.epoch, r.loss, r.lr, r.grad_norm, r.images_per_s)
}

fn eval_line(r: &EvalRow) -> String {
    format!("eval,{},{},{},{:.6},,,,,{:.4},{:.4}\n", r.step, r.epoch, r.model, r.loss, r.top1, r.top5)
}

impl Metrics {
    /// Rows in the order a run records them: by step, a step's evaluations after its step row.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(HEADER);
        out.push('\n');
        let mut evals = self.evals.iter().peekable();
        for r in &self.steps {
            while let Some(e) = evals.next_if(|e| e.step < r.step) {
                out.push_str(&eval_line(e));
            }
            out.push_str(&step_line(r));
        }
        evals.for_each(|e| out.push_str(&eval_line(e)));
        out
    }

    /// Rewrites `run/metrics.csv` with the rows so far (atomically) and appends every row
    /// recorded from now on to it.
    pub fn open_log(&mut self, run: &Path) -> Result<()> {
        let path = run.join("metrics.csv");
        write_atomic(&path, self.to_csv().as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        self.log = Some(file);
        Ok(())
    }

    fn append(&mut self, line: &str) -> Result<()> {
        use std::io::Write;
        match &mut self.log {
            // One write per row: a kill leaves whole rows, or at worst a last row without its
            // newline, which reading drops.
            Some(file) => file.write_all(line.as_bytes()).map_err(|source| Error::Io { path: "metrics.csv".into(), source }),
            None => Ok(()),
        }
    }

    pub fn record_step(&mut self, row: StepRow) -> Result<()> {
        self.append(&step_line(&row))?;
        self.steps.push(row);
        Ok(())
    }

    pub fn record_eval(&mut self, row: EvalRow) -> Result<()> {
        self.append(&eval_line(&row))?;
        self.evals.push(row);
        Ok(())
    }

    /// Makes the rows appended so far durable (before a checkpoint that covers them).
    pub fn sync(&self) -> Result<()> {
        match &self.log {
            Some(file) => file.sync_data().map_err(|source| Error::Io { path: "metrics.csv".into(), source }),
            None => Ok(()),
        }
    }

    /// Reads a `metrics.csv` written by [`to_csv`](Self::to_csv) (to continue it on resume).
    pub fn from_csv(text: &str, path: &Path) -> Result<Self> {
        let bad = |line: usize| Error::Data { path: path.to_path_buf(), reason: format!("line {line} is not a metrics row") };
        let mut metrics = Metrics::default();
        // A last row without its newline was cut by a kill mid-append: it is not a row.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        for (i, line) in complete.lines().enumerate().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() != 11 {
                return Err(bad(i + 1));
            }
            let num = |s: &str| s.parse::<f64>().map_err(|_| bad(i + 1));
            let int = |s: &str| s.parse::<u64>().map_err(|_| bad(i + 1));
            match f[0] {
                "step" => metrics.steps.push(StepRow {
                    step: int(f[1])?,
                    epoch: int(f[2])?,
                    loss: num(f[4])?,
                    lr: num(f[5])?,
                    lambda: if f[6].is_empty() { None } else { Some(num(f[6])?) },
                    grad_norm: num(f[7])?,
                    images_per_s: num(f[8])?,
                }),
                "eval" => metrics.evals.push(EvalRow {
                    step: int(f[1])?,
                    epoch: int(f[2])?,
                    model: f[3].to_string(),
                    loss: num(f[4])?,
                    top1: num(f[9])?,
                    top5: num(f[10])?,
                }),
                _ => return Err(bad(i + 1)),
            }
        }
        Ok(metrics)
    }

    /// Drops the rows after a checkpoint at (`step`, `epoch`): what a resumed run will redo.
    /// Evaluations are keyed by both, since re-calibration epochs evaluate at one step.
    pub fn truncate_after(&mut self, step: u64, epoch: u64) {
        self.steps.retain(|r| r.step <= step);
        self.evals.retain(|r| r.step <= step && r.epoch <= epoch);
    }

    pub fn write(&self, run: &Path) -> Result<()> {
        write_atomic(&run.join("metrics.csv"), self.to_csv().as_bytes())?;
        self.plot(&run.join("training.png"))
    }

    /// Four panels over optimizer steps: training loss, evaluation top-1/top-5, learning rate, λ.
    pub fn plot(&self, path: &Path) -> Result<()> {
        write_atomic_with(path, "plotting", |tmp| self.draw(tmp).map_err(|e| e.to_string()))
    }

    fn draw(&self, path: &Path) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((2, 2));
        let max_step = self.steps.last().map_or(1, |r| r.step.max(1)) as f64;
        let loss: Vec<(f64, f64)> = self.steps.iter().map(|r| (r.step as f64, r.loss)).collect();
        let lr: Vec<(f64, f64)> = self.steps.iter().map(|r| (r.step as f64, r.lr)).collect();
        let lambda: Vec<(f64, f64)> = self.steps.iter().filter_map(|r| r.lambda.map(|l| (r.step as f64, l))).collect();
        let evals: Vec<&EvalRow> = self.evals.iter().filter(|r| r.model == "model").collect();
        let top1: Vec<(f64, f64)> = evals.iter().map(|r| (r.step as f64, r.top1)).collect();
        let top5: Vec<(f64, f64)> = evals.iter().map(|r| (r.step as f64, r.top5)).collect();
        line_panel(&panels[0], "training loss", max_step, &[("loss", &loss, BLUE)])?;
        line_panel(&panels[1], "evaluation accuracy (%)", max_step, &[("top-1", &top1, RED), ("top-5", &top5, GREEN)])?;
        line_panel(&panels[2], "learning rate", max_step, &[("lr", &lr, MAGENTA)])?;
        line_panel(&panels[3], "PRepBN λ (LayerNorm weight)", max_step, &[("λ", &lambda, BLACK)])?;
        root.present()?;
        Ok(())
    }
}

type Panel<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn line_panel(area: &Panel, title: &str, max_step: f64, series: &[(&str, &Vec<(f64, f64)>, RGBColor)]) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let values = series.iter().flat_map(|(_, s, _)| s.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo, if hi > lo { hi } else { lo + 1.0 }) } else { (0.0, 1.0) };
    let pad = (hi - lo) * 0.05;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))?;
    chart.configure_mesh().x_desc("optimizer step").draw()?;
    for (name, points, color) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips_truncates_and_plots() {
        let mut m = Metrics::default();
        for step in 1..=5 {
            m.steps.push(StepRow { step, epoch: 0, loss: 2.0 / step as f64, lr: 1e-3, lambda: Some(1.0 - step as f64 / 5.0), grad_norm: 0.5, images_per_s: 100.0 });
        }
        m.evals.push(EvalRow { step: 5, epoch: 0, model: "model".into(), top1: 50.0, top5: 90.0, loss: 1.2 });
        let dir = tempfile::tempdir().unwrap();
        m.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        let mut back = Metrics::from_csv(&text, Path::new("metrics.csv")).unwrap();
        assert_eq!(back.steps.len(), 5);
        assert_eq!(back.evals[0].top1, 50.0);
        assert_eq!(back.steps[2].lambda, Some(0.4));
        back.truncate_after(3, 0);
        assert_eq!(back.steps.len(), 3);
        assert!(back.evals.is_empty());
        let png = std::fs::read(dir.path().join("training.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
