//! Rego policy sets: load `.rego` modules and data documents from a folder (or from sources
//! embedded in a binary), compile them once, evaluate entry points, and run `test_*` rules the
//! way `opa test` does.
//!
//! Errors always name the file, and the line where the engine reports one, so that a platform
//! team can fix a broken policy from the message alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use regorus::{CompiledPolicy, Engine, Value};

/// A policy file: its display path (used in every message) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Path shown in messages, relative to the policy folder where there is one.
    pub path: String,
    /// File content.
    pub text: String,
}

impl Source {
    /// Builds a source from a path and text.
    pub fn new(path: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            text: text.into(),
        }
    }

    /// Whether the file is a Rego module (the rest are data documents).
    pub fn is_rego(&self) -> bool {
        self.path.ends_with(".rego")
    }

    /// Whether the file holds Rego tests (`*_test.rego`).
    pub fn is_test(&self) -> bool {
        self.path.ends_with("_test.rego")
    }
}

/// Why a policy set could not be loaded, compiled or evaluated.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The folder or a file in it could not be read.
    #[error("cannot read policy {path}: {source}")]
    Read {
        /// The file or folder.
        path: String,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// A Rego module does not parse or compile. The message carries file, line and column.
    #[error("policy {path} does not compile: {message}")]
    Compile {
        /// The file.
        path: String,
        /// What the engine said, with line and column.
        message: String,
    },
    /// A data document is not valid JSON or YAML.
    #[error("data document {path} is not valid: {message}")]
    Data {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// The set has no Rego module at all.
    #[error("no .rego file found in {0}")]
    Empty(String),
    /// The modules parse, but the set does not compile as a whole (conflicts, unsafe vars...).
    #[error("policy set does not compile: {0}")]
    Link(String),
    /// Evaluation failed (conflicting values, a builtin error, a time limit...).
    #[error("policy evaluation of {rule} failed: {message}")]
    Eval {
        /// The rule that was evaluated.
        rule: String,
        /// What the engine said, with file and line where it gives them.
        message: String,
    },
}

/// A loaded, compiled set of Rego modules and data documents.
///
/// Cloning is cheap: the compiled state is shared.
#[derive(Clone)]
pub struct PolicySet {
    engine: Arc<Engine>,
    sources: Arc<Vec<Source>>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<&str> = self.sources.iter().map(|s| s.path.as_str()).collect();
        f.debug_struct("PolicySet")
            .field("sources", &paths)
            .finish()
    }
}

impl PolicySet {
    /// Loads every `.rego` file under `dir` (recursively, in sorted order) and every data
    /// document named `data.json`, `data.yaml` or `data.yml` (optionally with a prefix, as in
    /// `team.data.yaml`). Folders named `testdata` and hidden
    /// entries (Kubernetes ConfigMap mounts use `..data` links) are skipped.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        Self::from_sources(read_dir(dir)?)
    }

    /// Compiles a set from sources held in memory (embedded defaults, tests).
    pub fn from_sources(sources: Vec<Source>) -> Result<Self, PolicyError> {
        let mut engine = Engine::new();
        engine.set_rego_v0(false);
        for src in &sources {
            if src.is_rego() {
                engine
                    .add_policy(src.path.clone(), src.text.clone())
                    .map_err(|e| PolicyError::Compile {
                        path: src.path.clone(),
                        message: one_line(&e),
                    })?;
            } else {
                let value = parse_data(src)?;
                engine.add_data(value).map_err(|e| PolicyError::Data {
                    path: src.path.clone(),
                    message: one_line(&e),
                })?;
            }
        }
        // Compiling an (unused) entry point runs the analyzer over the whole set now, so that
        // conflicts and unsafe variables stop start-up instead of failing the first request.
        // The engine keeps that analysis, and every clone of it starts prepared.
        engine
            .eval_query("true".to_owned(), false)
            .map_err(|e| PolicyError::Link(one_line(&e)))?;
        Ok(Self {
            engine: Arc::new(engine),
            sources: Arc::new(sources),
        })
    }

    /// The files of the set, in load order.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Compiles one rule (for example `data.agentvm.decision`) into an entry point that can be
    /// evaluated from many threads at once.
    pub fn entrypoint(&self, rule: &str) -> Result<Entrypoint, PolicyError> {
        let mut engine = (*self.engine).clone();
        let name: regorus::Rc<str> = rule.into();
        let compiled = engine
            .compile_with_entrypoint(&name)
            .map_err(|e| PolicyError::Eval {
                rule: rule.to_owned(),
                message: one_line(&e),
            })?;
        Ok(Entrypoint {
            rule: rule.to_owned(),
            compiled,
        })
    }

    /// Evaluates one rule with `input` on a private copy of the engine.
    pub fn eval_rule(&self, rule: &str, input: Value) -> Result<Value, PolicyError> {
        let mut engine = (*self.engine).clone();
        engine.set_input(input);
        engine
            .eval_rule(rule.to_owned())
            .map_err(|e| PolicyError::Eval {
                rule: rule.to_owned(),
                message: one_line(&e),
            })
    }

    /// Runs every rule whose name starts with `test_`, like `opa test`. A test passes when it
    /// evaluates to `true`; `false`, undefined and errors fail it.
    pub fn run_tests(&self) -> TestReport {
        let mut outcomes = Vec::new();
        for src in self.sources.iter().filter(|s| s.is_rego()) {
            let Some(package) = package_of(&src.text) else {
                continue;
            };
            for (line, name) in test_rules(&src.text) {
                let rule = format!("data.{package}.{name}");
                let result = match self.eval_rule(&rule, Value::new_object()) {
                    Ok(Value::Bool(true)) => TestResult::Pass,
                    Ok(Value::Undefined) => TestResult::Fail("undefined".into()),
                    Ok(other) => TestResult::Fail(format!("evaluated to {other}")),
                    Err(e) => TestResult::Error(e.to_string()),
                };
                outcomes.push(TestOutcome {
                    file: src.path.clone(),
                    line,
                    rule: name,
                    result,
                });
            }
        }
        TestReport { outcomes }
    }
}

/// Bounds the wall-clock time of every policy evaluation in the process (a runaway rule, such
/// as a comprehension over `numbers.range(1, 1e9)`, then fails instead of holding a thread).
pub fn set_evaluation_time_limit(limit: std::time::Duration) {
    let config = regorus::utils::limits::ExecutionTimerConfig {
        limit,
        check_interval: std::num::NonZeroU32::MIN.saturating_add(63),
    };
    regorus::utils::limits::set_fallback_execution_timer_config(Some(config));
}

/// A compiled rule, evaluated concurrently without locks.
#[derive(Clone)]
pub struct Entrypoint {
    rule: String,
    compiled: CompiledPolicy,
}

impl std::fmt::Debug for Entrypoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entrypoint")
            .field("rule", &self.rule)
            .finish()
    }
}

impl Entrypoint {
    /// Evaluates the rule for `input`. Undefined comes back as `Value::Undefined`.
    pub fn eval(&self, input: Value) -> Result<Value, PolicyError> {
        self.compiled
            .eval_with_input(input)
            .map_err(|e| PolicyError::Eval {
                rule: self.rule.clone(),
                message: one_line(&e),
            })
    }

    /// The rule this entry point evaluates.
    pub fn rule(&self) -> &str {
        &self.rule
    }
}

/// Engines kept for reuse by one [`Rules`]; more than this many idle ones are dropped.
const IDLE_ENGINES: usize = 4;

/// Rules evaluated for one input on an engine kept between evaluations: a fresh engine per
/// call (what [`Entrypoint::eval`] does) costs more than a small policy's rules.
pub struct Rules {
    rules: Vec<String>,
    base: Arc<Engine>,
    idle: std::sync::Mutex<Vec<Engine>>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules").field("rules", &self.rules).finish()
    }
}

impl Clone for Rules {
    fn clone(&self) -> Self {
        Self {
            rules: self.rules.clone(),
            base: self.base.clone(),
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl PolicySet {
    /// The rules `rules` (paths such as `data.agentvm.allow`), evaluated together by
    /// [`Rules::eval`]. A path that names no rule is an error.
    pub fn rules(&self, rules: &[&str]) -> Result<Rules, PolicyError> {
        for rule in rules {
            self.entrypoint(rule)?;
        }
        Ok(Rules {
            rules: rules.iter().map(|r| (*r).to_owned()).collect(),
            base: self.engine.clone(),
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }
}

impl Rules {
    /// The value of each rule for `input`, in order; undefined ones as `Value::Undefined`.
    /// An engine whose evaluation failed is dropped, never reused.
    pub fn eval(&self, input: Value) -> Result<Vec<Value>, PolicyError> {
        let reused = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut engine = reused.unwrap_or_else(|| (*self.base).clone());
        engine.set_input(input);
        let mut values = Vec::with_capacity(self.rules.len());
        for rule in &self.rules {
            let value = engine
                .eval_rule(rule.clone())
                .map_err(|e| PolicyError::Eval {
                    rule: rule.clone(),
                    message: one_line(&e),
                })?;
            values.push(value);
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < IDLE_ENGINES {
                idle.push(engine);
            }
        }
        Ok(values)
    }
}

/// The result of one Rego test rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestResult {
    /// The rule evaluated to `true`.
    Pass,
    /// The rule evaluated to something else, or was undefined.
    Fail(String),
    /// Evaluating the rule raised an error.
    Error(String),
}

/// One test rule and its result.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    /// File that defines the rule.
    pub file: String,
    /// Line of the rule head (1-based).
    pub line: usize,
    /// Rule name.
    pub rule: String,
    /// What happened.
    pub result: TestResult,
}

/// All outcomes of a test run.
#[derive(Debug, Clone, Default)]
pub struct TestReport {
    /// One entry per test rule, in file order.
    pub outcomes: Vec<TestOutcome>,
}

impl TestReport {
    /// Number of passing tests.
    pub fn passed(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.result == TestResult::Pass)
            .count()
    }

    /// Number of failing or erroring tests.
    pub fn failed(&self) -> usize {
        self.outcomes.len() - self.passed()
    }
}

/// Reads every policy file under `dir` (see [`PolicySet::load_dir`]) without compiling, so that
/// callers can filter (for example leave `_test.rego` files out of a serving set).
pub fn read_dir(dir: &Path) -> Result<Vec<Source>, PolicyError> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files)?;
    files.sort();
    let mut sources = Vec::with_capacity(files.len());
    for (rel, path) in files {
        let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Read {
            path: rel.clone(),
            source,
        })?;
        sources.push(Source::new(rel, text));
    }
    if !sources.iter().any(Source::is_rego) {
        return Err(PolicyError::Empty(dir.display().to_string()));
    }
    Ok(sources)
}

fn collect_files(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), PolicyError> {
    let read_err = |source| PolicyError::Read {
        path: dir.display().to_string(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // `metadata` follows symlinks, which ConfigMap mounts are made of.
        let meta = std::fs::metadata(&path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if meta.is_dir() {
            if name != "testdata" {
                collect_files(root, &path, out)?;
            }
            continue;
        }
        let wanted = name.ends_with(".rego") || is_data_document(&name);
        if wanted {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            out.push((rel, path));
        }
    }
    Ok(())
}

/// `data.json`, `data.yaml`, `data.yml`, or the same with a prefix (`team.data.yaml`), so that
/// several ConfigMaps can be projected into one folder without their keys colliding.
fn is_data_document(name: &str) -> bool {
    ["data.json", "data.yaml", "data.yml"]
        .iter()
        .any(|d| name == *d || name.strip_suffix(d).is_some_and(|p| p.ends_with('.')))
}

fn parse_data(src: &Source) -> Result<Value, PolicyError> {
    let err = |message: String| PolicyError::Data {
        path: src.path.clone(),
        message,
    };
    let json: serde_json::Value = if src.path.ends_with(".json") {
        serde_json::from_str(&src.text).map_err(|e| err(e.to_string()))?
    } else {
        serde_yaml::from_str(&src.text).map_err(|e| err(e.to_string()))?
    };
    if !json.is_object() {
        return Err(err("the top level must be an object".into()));
    }
    Value::from_json_str(&json.to_string()).map_err(|e| err(one_line(&e)))
}

/// The package path of a module (`package agentvm.tools` gives `agentvm.tools`).
fn package_of(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix("package ")?;
        Some(rest.split('#').next().unwrap_or(rest).trim().to_owned())
    })
}

/// Test rules of a module: rule heads at the start of a line whose name starts with `test_`.
/// Rules with the same name (incremental definitions) are reported once.
fn test_rules(text: &str) -> Vec<(usize, String)> {
    let mut found: Vec<(usize, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if !line.starts_with("test_") {
            continue;
        }
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !found.iter().any(|(_, n)| *n == name) {
            found.push((i + 1, name));
        }
    }
    found
}

/// The engine's errors span several lines (location, source line, caret, message); logs and
/// admission messages want one: `file:line:col: message (source line)`.
fn one_line(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let location = lines
        .iter()
        .find_map(|l| l.strip_prefix("-->"))
        .map(str::trim);
    let message = lines
        .iter()
        .find_map(|l| l.strip_prefix("error:"))
        .map(str::trim);
    let code = lines.iter().find_map(|l| {
        let (num, rest) = l.split_once('|')?;
        (!num.trim().is_empty() && num.trim().chars().all(|c| c.is_ascii_digit()))
            .then(|| rest.trim())
            .filter(|r| !r.is_empty() && !r.chars().all(|c| c == '^' || c == ' '))
    });
    match (location, message) {
        (Some(loc), Some(msg)) => match code {
            Some(code) => format!("{loc}: {msg} (in `{code}`)"),
            None => format!("{loc}: {msg}"),
        },
        _ => lines.join(" | "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> Result<PolicySet, PolicyError> {
        PolicySet::from_sources(vec![Source::new("p/policy.rego", text)])
    }

    #[test]
    fn compile_error_names_file_and_line() {
        let err = set("package x\n\nallow if {\n  input.a ==\n}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("p/policy.rego"), "{err}");
        assert!(err.contains("p/policy.rego:5:1: "), "{err}");
    }

    #[test]
    fn conflicts_are_found_at_load_or_eval() {
        let s = set("package x\n\nv := 1\n\nv := 2 if true\n");
        match s {
            Err(e) => assert!(e.to_string().contains("policy"), "{e}"),
            Ok(s) => assert!(s.eval_rule("data.x.v", Value::new_object()).is_err()),
        }
    }

    #[test]
    fn a_runaway_rule_fails_within_the_time_limit() {
        let s = set("package x\n\nr := numbers.range(1, 3000)\n\nn := count([x | some i in r; some j in r; x := i * j])\n").unwrap();
        set_evaluation_time_limit(std::time::Duration::from_millis(200));
        let started = std::time::Instant::now();
        let result = s.entrypoint("data.x.n").unwrap().eval(Value::new_object());
        regorus::utils::limits::set_fallback_execution_timer_config(None);
        assert!(result.is_err(), "{result:?}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn runs_test_rules_with_lines() {
        let s = set("package x\n\nok := 1\n\ntest_ok if ok == 1\n\ntest_bad if ok == 2\n").unwrap();
        let report = s.run_tests();
        assert_eq!(report.passed(), 1);
        assert_eq!(report.failed(), 1);
        let bad = &report.outcomes[1];
        assert_eq!((bad.rule.as_str(), bad.line), ("test_bad", 7));
        assert_eq!(bad.result, TestResult::Fail("undefined".into()));
    }

    #[test]
    fn rules_reuse_engines_across_inputs_and_failures() {
        let set =
            set("package t\n\nx := input.a + 1\n\ny := concat(\"-\", [input.b, \"z\"])\n").unwrap();
        let rules = set.rules(&["data.t.x", "data.t.y"]).unwrap();
        assert!(set.rules(&["data.t.nothing"]).is_err());
        let input =
            |a: serde_json::Value, b: &str| Value::from(serde_json::json!({"a": a, "b": b}));
        for i in 0..3 {
            let v = rules.eval(input(serde_json::json!(i), "q")).unwrap();
            assert_eq!(v, [Value::from(i + 1), Value::from("q-z")]);
            // An input the rules fail on (an error or undefined, as the engine has it) leaves
            // nothing behind for the next one.
            let bad = rules.eval(Value::from(serde_json::json!({"a": "text", "b": 1})));
            assert!(!matches!(bad.as_deref(), Ok([Value::Number(_), _])));
        }
        let v = rules.eval(Value::from(serde_json::json!({}))).unwrap();
        assert_eq!(v, [Value::Undefined, Value::Undefined]);
    }

    #[test]
    fn entrypoint_evaluates_with_input() {
        let s = set("package x\n\nv := input.a + 1\n").unwrap();
        let e = s.entrypoint("data.x.v").unwrap();
        let input = Value::from_json_str(r#"{"a": 41}"#).unwrap();
        assert_eq!(e.eval(input).unwrap(), Value::from(42));
        assert_eq!(e.eval(Value::new_object()).unwrap(), Value::Undefined);
    }

    #[test]
    fn data_documents_merge_and_bad_ones_are_named() {
        let ok = PolicySet::from_sources(vec![
            Source::new("policy.rego", "package x\n\nv := data.cfg.n\n"),
            Source::new("data.yaml", "cfg:\n  n: 3\n"),
        ])
        .unwrap();
        assert_eq!(
            ok.eval_rule("data.x.v", Value::new_object()).unwrap(),
            Value::from(3)
        );
        let bad = PolicySet::from_sources(vec![
            Source::new("policy.rego", "package x\n"),
            Source::new("data.json", "{nope"),
        ])
        .unwrap_err();
        assert!(bad.to_string().contains("data.json"), "{bad}");
    }

    #[test]
    fn load_dir_skips_hidden_and_testdata() {
        let dir = std::env::temp_dir().join(format!("agentvm-policy-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/testdata")).unwrap();
        std::fs::create_dir_all(dir.join("..2024_data")).unwrap();
        std::fs::write(dir.join("a/policy.rego"), "package a\n\nv := data.team.v\n").unwrap();
        std::fs::write(dir.join("a/team.data.yaml"), "team:\n  v: 1\n").unwrap();
        std::fs::write(dir.join("a/metadata.yaml"), "not: data\n").unwrap();
        std::fs::write(dir.join("a/testdata/broken.rego"), "package").unwrap();
        std::fs::write(dir.join("..2024_data/broken.rego"), "package").unwrap();
        let s = PolicySet::load_dir(&dir).unwrap();
        let paths: Vec<&str> = s.sources().iter().map(|s| s.path.as_str()).collect();
        assert_eq!(paths, ["a/policy.rego", "a/team.data.yaml"]);
        assert_eq!(
            s.eval_rule("data.a.v", Value::new_object()).unwrap(),
            Value::from(1)
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let empty = std::env::temp_dir().join(format!("agentvm-empty-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        assert!(matches!(
            PolicySet::load_dir(&empty),
            Err(PolicyError::Empty(_))
        ));
        std::fs::remove_dir_all(&empty).unwrap();
    }
}
