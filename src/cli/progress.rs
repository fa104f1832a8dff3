//! Progress of a run or a study: a bar on a terminal, one plain line per evaluation otherwise,
//! or JSON lines for tools; rates in human units (`2,661 steps/s`) and ETAs.

use bnlab::{Error, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Instant;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// Bars on stderr (a terminal).
    Bar,
    /// One line per evaluation on stderr.
    Plain,
    /// One JSON object per evaluation on stdout.
    Json,
}

impl ProgressMode {
    /// `auto` or `bar` (a bar when stderr is a terminal, else plain lines: bars are not drawn
    /// into files), `plain` or `json`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" | "bar" if std::io::stderr().is_terminal() => Ok(ProgressMode::Bar),
            "auto" | "bar" | "plain" => Ok(ProgressMode::Plain),
            "json" => Ok(ProgressMode::Json),
            other => Err(Error::config(
                "--progress",
                format!("'{other}' (expected auto, bar, plain or json)"),
            )),
        }
    }
}

/// `n` with thousands separators: 2661 -> "2,661".
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A rate in steps per second: `2,661 steps/s`, `28.4 steps/s`, `0.52 steps/s`.
pub fn fmt_rate(r: f64) -> String {
    if !r.is_finite() || r <= 0.0 {
        "- steps/s".into()
    } else if r >= 100.0 {
        format!("{} steps/s", group(r.round() as u64))
    } else if r >= 10.0 {
        format!("{r:.1} steps/s")
    } else {
        format!("{r:.2} steps/s")
    }
}

/// A duration: `1.2 s`, `45 s`, `3 min 05 s`, `1 h 02 min`.
pub fn fmt_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    if secs < 9.95 {
        return format!("{secs:.1} s");
    }
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    }
}

/// Rate and ETA of one run, measured from the first step seen in this process.
#[derive(Clone, Debug)]
pub struct Meter {
    start: Instant,
    first_step: Option<usize>,
    step: usize,
    steps: usize,
}

impl Meter {
    /// A run of `steps` steps.
    pub fn new(steps: usize) -> Self {
        Meter {
            start: Instant::now(),
            first_step: None,
            step: 0,
            steps,
        }
    }

    /// The run is at `step`.
    pub fn at(&mut self, step: usize) {
        if self.first_step.is_none() {
            self.first_step = Some(step);
            self.start = Instant::now();
        }
        self.step = step;
    }

    /// Steps done in this process.
    pub fn session_steps(&self) -> usize {
        self.step
            .saturating_sub(self.first_step.unwrap_or(self.step))
    }

    /// Steps per second in this process (`None` before a step has been timed).
    pub fn rate(&self) -> Option<f64> {
        let secs = self.start.elapsed().as_secs_f64();
        let n = self.session_steps();
        (n > 0 && secs > 0.0).then(|| n as f64 / secs)
    }

    /// Seconds to the end at the current rate.
    pub fn eta(&self) -> Option<f64> {
        Some(self.steps.saturating_sub(self.step) as f64 / self.rate()?)
    }

    /// `2,661 steps/s, ETA 18 s`.
    pub fn describe(&self) -> String {
        match (self.rate(), self.eta()) {
            (Some(r), Some(e)) => format!("{}, ETA {}", fmt_rate(r), fmt_duration(e)),
            _ => "measuring speed".into(),
        }
    }
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>24} [{bar:30}] {human_pos:>6}/{human_len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn json_line(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn finite(x: Option<f64>) -> serde_json::Value {
    x.filter(|v| v.is_finite())
        .map_or(serde_json::Value::Null, Into::into)
}

/// One run's progress (`train`).
pub struct Reporter {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    name: String,
    meter: Meter,
    last: String,
    quiet: bool,
}

impl Reporter {
    /// Show nothing (the ranks of a data-parallel run other than rank 0).
    pub fn silenced(mut self) -> Self {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        self.quiet = true;
        self
    }

    /// A run called `name` of `steps` steps, starting (or resuming) at `step`.
    pub fn new(mode: ProgressMode, name: &str, steps: usize, step: usize) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let b = ProgressBar::new(steps as u64).with_style(bar_style());
            b.set_prefix(name.to_string());
            b.set_position(step as u64);
            b
        });
        let mut meter = Meter::new(steps);
        meter.at(step);
        Reporter {
            mode,
            bar,
            name: name.to_string(),
            meter,
            last: String::new(),
            quiet: false,
        }
    }

    /// A step is done.
    pub fn step(&mut self, step: usize) {
        self.meter.at(step);
        if let Some(b) = &self.bar {
            if step.is_multiple_of(50) {
                b.set_position(step as u64);
                b.set_message(format!("{}{}", self.meter.describe(), self.last));
            }
        }
    }

    /// An evaluation is done.
    pub fn evaluated(&mut self, step: usize, loss: f64, accuracy: f64) {
        self.meter.at(step);
        if self.quiet {
            return;
        }
        let steps = self.meter.steps;
        match self.mode {
            ProgressMode::Json => json_line(serde_json::json!({
                "run": self.name,
                "step": step,
                "steps": steps,
                "loss": finite(Some(loss)),
                "accuracy": finite(Some(accuracy)),
                "rate": finite(self.meter.rate()),
                "eta": finite(self.meter.eta()),
            })),
            ProgressMode::Plain | ProgressMode::Bar => {
                let line = format!(
                    "step {step}: train loss {loss:.4}, test accuracy {:.2}% ({} of {}; {})",
                    100.0 * accuracy,
                    group(step as u64),
                    group(steps as u64),
                    self.meter.describe()
                );
                self.last = format!(", loss {loss:.4}, test acc {:.2}%", 100.0 * accuracy);
                self.println(&line);
            }
        }
    }

    /// A line above the bar (or on stderr).
    pub fn println(&self, line: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Remove the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// Leave the bar where it is (after an error or a stop).
    pub fn abandon(&self) {
        if let Some(b) = &self.bar {
            b.abandon();
        }
    }

    /// Seconds since the first step of this process.
    pub fn elapsed(&self) -> f64 {
        self.meter.start.elapsed().as_secs_f64()
    }
}

/// What a study's run reports.
pub struct RunUpdate<'a> {
    /// The bar the run is drawn on (worker or variant index).
    pub slot: usize,
    /// The run's label.
    pub label: &'a str,
    /// Steps done.
    pub step: usize,
    /// Steps of the run.
    pub steps: usize,
    /// Loss, when known.
    pub loss: Option<f64>,
    /// The latest test accuracy.
    pub accuracy: Option<f64>,
    /// An evaluation just happened.
    pub evaluated: bool,
    /// The run is done.
    pub finished: bool,
}

struct StudyState {
    runs: HashMap<String, (Meter, bool)>,
}

/// A study's progress: a bar per worker and one for the study (runs done, total ETA), or plain
/// or JSON lines.
pub struct StudyMeter {
    mode: ProgressMode,
    name: String,
    runs_total: usize,
    steps_per_run: usize,
    start: Instant,
    multi: Option<MultiProgress>,
    total: Option<ProgressBar>,
    slots: Vec<ProgressBar>,
    state: Mutex<StudyState>,
}

impl StudyMeter {
    /// A study `name` of `runs_total` runs of `steps_per_run` steps, drawn on `slots` bars.
    pub fn new(
        mode: ProgressMode,
        name: &str,
        runs_total: usize,
        steps_per_run: usize,
        slots: usize,
    ) -> Self {
        let (multi, total, bars) = if mode == ProgressMode::Bar {
            let multi = MultiProgress::new();
            let total = multi.add(
                ProgressBar::new(runs_total as u64).with_style(
                    ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} runs {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                ),
            );
            total.set_prefix(name.to_string());
            total.enable_steady_tick(std::time::Duration::from_secs(1));
            let bars = (0..slots)
                .map(|_| {
                    let b =
                        multi.add(ProgressBar::new(steps_per_run as u64).with_style(bar_style()));
                    b.set_prefix("waiting");
                    b
                })
                .collect();
            (Some(multi), Some(total), bars)
        } else {
            (None, None, Vec::new())
        };
        StudyMeter {
            mode,
            name: name.to_string(),
            runs_total,
            steps_per_run,
            start: Instant::now(),
            multi,
            total,
            slots: bars,
            state: Mutex::new(StudyState {
                runs: HashMap::new(),
            }),
        }
    }

    /// (runs done, the study's ETA in seconds)
    fn totals(&self, st: &StudyState) -> (usize, Option<f64>) {
        let done = st.runs.values().filter(|(_, f)| *f).count();
        let steps_done: usize = st
            .runs
            .values()
            .map(|(m, f)| if *f { m.steps } else { m.step })
            .sum();
        let session: usize = st.runs.values().map(|(m, _)| m.session_steps()).sum();
        let secs = self.start.elapsed().as_secs_f64();
        let remaining = (self.runs_total * self.steps_per_run).saturating_sub(steps_done);
        let eta = (session > 0 && secs > 0.0).then(|| remaining as f64 * secs / session as f64);
        (done, eta)
    }

    /// A run of the study moved.
    pub fn update(&self, u: RunUpdate<'_>) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let new = !st.runs.contains_key(u.label);
        let entry = st
            .runs
            .entry(u.label.to_string())
            .or_insert_with(|| (Meter::new(u.steps), false));
        entry.0.at(u.step);
        let was_finished = entry.1;
        entry.1 |= u.finished;
        let describe = entry.0.describe();
        let (rate, eta) = (entry.0.rate(), entry.0.eta());
        let (done, study_eta) = self.totals(&st);
        let study = format!(
            "{done}/{} runs, study ETA {}",
            self.runs_total,
            study_eta.map_or_else(|| "?".to_string(), fmt_duration)
        );
        let acc = u
            .accuracy
            .map(|a| format!(", test accuracy {:.2}%", 100.0 * a))
            .unwrap_or_default();
        match self.mode {
            ProgressMode::Bar => {
                if let Some(b) = self.slots.get(u.slot) {
                    if new && !u.finished {
                        b.reset();
                        b.set_length(u.steps as u64);
                        b.set_prefix(u.label.to_string());
                    }
                    b.set_position(u.step as u64);
                    b.set_message(format!("{describe}{acc}"));
                }
                if let Some(t) = &self.total {
                    t.set_position(done as u64);
                    t.set_message(format!(
                        "study ETA {}",
                        study_eta.map_or_else(|| "?".to_string(), fmt_duration)
                    ));
                    if u.finished && !was_finished {
                        t.println(format!("{}: done{acc} ({study})", u.label));
                    }
                }
            }
            ProgressMode::Plain => {
                if u.finished && !was_finished {
                    eprintln!("{}: done{acc} ({study})", u.label);
                } else if u.evaluated && !u.finished {
                    let loss = u
                        .loss
                        .filter(|l| l.is_finite())
                        .map(|l| format!(", train loss {l:.4}"))
                        .unwrap_or_default();
                    eprintln!(
                        "{}: step {} of {}{loss}{acc}; {describe} ({study})",
                        u.label,
                        group(u.step as u64),
                        group(u.steps as u64)
                    );
                }
            }
            ProgressMode::Json => {
                if u.evaluated || (u.finished && !was_finished) {
                    json_line(serde_json::json!({
                        "study": self.name,
                        "run": u.label,
                        "step": u.step,
                        "steps": u.steps,
                        "loss": finite(u.loss),
                        "accuracy": finite(u.accuracy),
                        "rate": finite(rate),
                        "eta": finite(eta),
                        "finished": u.finished,
                        "runs_done": done,
                        "runs": self.runs_total,
                        "study_eta": finite(study_eta),
                    }));
                }
            }
        }
    }

    /// Remove the bars.
    pub fn finish(&self) {
        for b in &self.slots {
            b.finish_and_clear();
        }
        if let Some(t) = &self.total {
            t.finish();
        }
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }

    /// (runs done, runs in all)
    pub fn runs(&self) -> (usize, usize) {
        let done = self
            .state
            .lock()
            .map(|st| st.runs.values().filter(|(_, f)| *f).count())
            .unwrap_or(0);
        (done, self.runs_total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(fmt_rate(2661.0848), "2,661 steps/s");
        assert_eq!(fmt_rate(28.44), "28.4 steps/s");
        assert_eq!(fmt_rate(0.5249), "0.52 steps/s");
        assert_eq!(fmt_duration(18.2), "18 s");
        assert_eq!(fmt_duration(1.23), "1.2 s");
        assert_eq!(fmt_duration(185.0), "3 min 05 s");
        assert_eq!(fmt_duration(3720.0), "1 h 02 min");
        assert_eq!(group(1_234_567), "1,234,567");
        assert_eq!(group(999), "999");
    }
}
