//! Running the checker, and rendering what it found.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use stateright::{Checker, Expectation, HasDiscoveries, Model, Path};

use super::state::{frame_brief, State};
use super::{Action, ProtocolModel};

/// Search order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Shortest counterexamples; more memory.
    Bfs,
    Dfs,
}

/// When to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Explore every reachable state (or until every property has a discovery).
    Exhaustive,
    /// Stop at the first counterexample (for mutation tests).
    FirstFailure,
}

/// A property and what the checker found for it.
pub struct PropertyResult {
    pub name: &'static str,
    pub expectation: Expectation,
    /// Example (sometimes) or counterexample (always, eventually).
    pub discovery: Option<Path<State, Action>>,
}

impl PropertyResult {
    /// True if the property holds: no counterexample, or an example was found.
    pub fn ok(&self) -> bool {
        match self.expectation {
            Expectation::Sometimes => self.discovery.is_some(),
            _ => self.discovery.is_none(),
        }
    }
}

/// Figures and results of one checker run.
pub struct CheckRun {
    pub config: &'static str,
    pub total_states: usize,
    pub unique_states: usize,
    pub max_depth: usize,
    pub elapsed: Duration,
    pub properties: Vec<PropertyResult>,
}

impl CheckRun {
    pub fn all_ok(&self) -> bool {
        self.properties.iter().all(PropertyResult::ok)
    }
    pub fn result(&self, name: &str) -> Option<&PropertyResult> {
        self.properties.iter().find(|p| p.name == name)
    }
    /// Names of violated always/eventually properties.
    pub fn violations(&self) -> Vec<&'static str> {
        self.properties
            .iter()
            .filter(|p| p.expectation != Expectation::Sometimes && !p.ok())
            .map(|p| p.name)
            .collect()
    }
    /// The counterexample of the first violated property, rendered, if any.
    pub fn first_violation_trace(&self) -> Option<String> {
        let first = *self.violations().first()?;
        let path = self.result(first)?.discovery.as_ref()?;
        Some(render_path(first, path))
    }
    pub fn states_per_sec(&self) -> f64 {
        self.total_states as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the checker to completion and collects the results.
pub fn run(model: ProtocolModel, strategy: Strategy, threads: usize, stop: Stop) -> CheckRun {
    run_with_progress(model, strategy, threads, stop, |_| {})
}

/// Figures of a run in progress.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub total_states: usize,
    pub unique_states: usize,
    pub max_depth: usize,
    pub elapsed: Duration,
}

/// Like [`run`], calling `progress` about every ten seconds until the run ends.
pub fn run_with_progress(
    model: ProtocolModel,
    strategy: Strategy,
    threads: usize,
    stop: Stop,
    progress: impl FnMut(&Progress),
) -> CheckRun {
    let config = model.cfg.name;
    let builder = model
        .checker()
        .threads(threads.max(1))
        .finish_when(match stop {
            Stop::Exhaustive => HasDiscoveries::All,
            Stop::FirstFailure => HasDiscoveries::AnyFailures,
        });
    let start = Instant::now();
    match strategy {
        Strategy::Bfs => finish(config, builder.spawn_bfs(), start, progress),
        Strategy::Dfs => finish(config, builder.spawn_dfs(), start, progress),
    }
}

fn finish(
    config: &'static str,
    c: impl Checker<ProtocolModel>,
    start: Instant,
    mut progress: impl FnMut(&Progress),
) -> CheckRun {
    const EVERY: Duration = Duration::from_secs(10);
    let mut next = start + EVERY;
    while !c.is_done() {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() >= next {
            next += EVERY;
            progress(&Progress {
                total_states: c.state_count(),
                unique_states: c.unique_state_count(),
                max_depth: c.max_depth(),
                elapsed: start.elapsed(),
            });
        }
    }
    let c = c.join();
    let elapsed = start.elapsed();
    let mut found = c.discoveries();
    let properties = c
        .model()
        .properties()
        .into_iter()
        .map(|p| PropertyResult {
            name: p.name,
            expectation: p.expectation,
            discovery: found.remove(p.name),
        })
        .collect();
    CheckRun {
        config,
        total_states: c.state_count(),
        unique_states: c.unique_state_count(),
        max_depth: c.max_depth(),
        elapsed,
        properties,
    }
}

/// One line per step: the action taken and both sides afterwards.
pub fn render_path(title: &str, path: &Path<State, Action>) -> String {
    let steps = path.clone().into_vec();
    let mut out = format!("# {title}\n# {} steps\n\n", steps.len().saturating_sub(1));
    let mut prev: Option<(State, Action)> = None;
    for (i, (state, action)) in steps.into_iter().enumerate() {
        let what = match &prev {
            None => "initial state (source started)".to_string(),
            Some((before, a)) => describe(before, a),
        };
        let _ = writeln!(out, "step {i}: {what}\n{}\n", state.summary());
        prev = action.map(|a| (state, a));
    }
    out
}

/// An action in words, with the frame it delivers when it delivers one.
pub fn describe(before: &State, a: &Action) -> String {
    match a {
        Action::CtrlToDst => format!(
            "source -> destination: {}",
            before.s2d.front().map_or("?".into(), |b| frame_brief(b))
        ),
        Action::CtrlToSrc => format!(
            "destination -> source: {}",
            before.d2s.front().map_or("?".into(), |b| frame_brief(b))
        ),
        Action::Land(ch) => format!(
            "data{ch}: write {} reaches the NIC",
            before.data[*ch as usize]
                .writes
                .front()
                .map_or("?".into(), |w| format!("w{} key {:#x}", w.wr_id, w.rkey))
        ),
        Action::Inject(i) => format!("hostile peer sends {i:?}"),
        other => format!("{other:?}"),
    }
}

/// File name for a property's counterexample: `counterexample-<slug>.txt`.
pub fn trace_file_name(property: &str) -> String {
    let mut slug = String::new();
    for c in property.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    format!("counterexample-{}.txt", slug.trim_end_matches('-'))
}
