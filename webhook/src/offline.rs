//! `agentvm review`: the webhook's decision on manifests or AdmissionReviews from files, with no
//! cluster. A bare object is reviewed as the CREATE an API server would send for it.

use std::io::Read;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::admission::{Mode, Reviewer};
use crate::profile_name::Profile;
use crate::review::{self, Request, Response};
use crate::workload::WorkloadKind;

/// A document that cannot be reviewed. The message names the file and the document index.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct InputError {
    /// `file#index`, or the file alone when it cannot be read.
    pub source_name: String,
    /// What is wrong.
    pub message: String,
}

/// One document, ready to review.
#[derive(Debug, Clone)]
pub struct Document {
    /// `file#index` (0-based, counting every document of the file).
    pub source: String,
    /// The request as the API server would send it.
    pub request: Request,
}

/// The result for one document.
#[derive(Debug, Clone)]
pub struct Reviewed {
    /// `file#index`.
    pub source: String,
    /// The request that was reviewed.
    pub request: Request,
    /// The answer, exactly as `/mutate` would give it.
    pub response: Response,
    /// The object with the patch applied; `None` when denied.
    pub patched: Option<Value>,
    /// The effective profile, for agents.
    pub profile: Option<Profile>,
}

/// Reads every document of `path` (`-` is standard input).
pub fn read_file(path: &str) -> Result<Vec<Document>, InputError> {
    let text = if path == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| InputError {
                source_name: "-".into(),
                message: e.to_string(),
            })?;
        s
    } else {
        std::fs::read_to_string(path).map_err(|e| InputError {
            source_name: path.into(),
            message: e.to_string(),
        })?
    };
    parse_documents(path, &text)
}

/// Parses YAML or JSON text holding one or more documents. Empty documents are skipped but
/// counted, so that indices match what an editor shows; YAML merge keys (`<<`) are applied as
/// kubectl applies them; a `kind: List` is reviewed item by item (`file#2.0`, `file#2.1`...).
/// Text without any document is an error: a review of nothing proves nothing.
pub fn parse_documents(name: &str, text: &str) -> Result<Vec<Document>, InputError> {
    let mut out = Vec::new();
    for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let source = format!("{name}#{index}");
        let err = |message: String| InputError {
            source_name: source.clone(),
            message,
        };
        let mut yaml = serde_yaml::Value::deserialize(de)
            .map_err(|e| err(format!("not valid YAML or JSON: {e}")))?;
        yaml.apply_merge()
            .map_err(|e| err(format!("invalid YAML merge key: {e}")))?;
        let value: Value = serde_yaml::from_value(yaml)
            .map_err(|e| err(format!("not representable as JSON: {e}")))?;
        if value.is_null() {
            continue;
        }
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let items = value
                .get("items")
                .and_then(Value::as_array)
                .ok_or_else(|| err("a List must have an items array".into()))?;
            for (i, item) in items.iter().enumerate() {
                let source = format!("{name}#{index}.{i}");
                let request =
                    to_request(item.clone(), index * 1000 + i).map_err(|message| InputError {
                        source_name: source.clone(),
                        message,
                    })?;
                out.push(Document { source, request });
            }
            continue;
        }
        let request = to_request(value, index).map_err(err)?;
        out.push(Document { source, request });
    }
    if out.is_empty() {
        return Err(InputError {
            source_name: name.into(),
            message: "no document to review".into(),
        });
    }
    Ok(out)
}

/// The request an API server would send to create `value` (an AdmissionReview is taken as is).
pub fn to_request(value: Value, index: usize) -> Result<Request, String> {
    if !value.is_object() {
        return Err(
            "a document must be an object (an AdmissionReview or a Kubernetes object)".into(),
        );
    }
    if value.get("kind").and_then(Value::as_str) == Some("AdmissionReview") {
        return review::from_value(value).map_err(|e| format!("invalid AdmissionReview: {e}"));
    }
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version.is_empty() || kind.is_empty() {
        return Err("the object has no apiVersion or kind".into());
    }
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let meta = value.get("metadata");
    let text = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    let namespace = match text("namespace") {
        "" => "default",
        ns => ns,
    };
    let resource = WorkloadKind::from_group_kind(group, kind)
        .map(|k| format!("{}s", k.name().to_lowercase()))
        .unwrap_or_else(|| format!("{}s", kind.to_lowercase()));
    let review = json!({
        "apiVersion": review::API_VERSION,
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("agentvm-review-{index}"),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "requestResource": {"group": group, "version": version, "resource": resource},
            "name": text("name"),
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "agentvm-review"},
            "object": value,
            "oldObject": null,
            "dryRun": true,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    });
    review::from_value(review).map_err(|e| e.to_string())
}

/// Reviews one document as `/mutate` would, applies the patch, and checks the result with
/// `/validate` (a denial there is reported as the answer: it is what the cluster would do).
pub fn review_document(reviewer: &Reviewer, doc: &Document) -> Reviewed {
    let outcome = reviewer.review(Mode::Mutate, &doc.request);
    let mut response = outcome.response;
    let mut patched = None;
    if response.allowed {
        let mut object = doc.request.object().cloned().unwrap_or(Value::Null);
        if let Some(ops) = &response.patch {
            let applied = serde_json::from_value::<json_patch::Patch>(ops.clone())
                .map_err(|e| e.to_string())
                .and_then(|p| json_patch::patch(&mut object, &p).map_err(|e| e.to_string()));
            if let Err(e) = applied {
                response = Response::deny(
                    &doc.request.uid,
                    500,
                    format!("agentvm produced a patch that does not apply: {e}"),
                );
            }
        }
        if response.allowed {
            let mut check = doc.request.clone();
            check.raw["object"] = object.clone();
            let validated = reviewer.review(Mode::Validate, &check);
            if !validated.response.allowed {
                response = validated.response;
            } else {
                patched = Some(object);
            }
        }
    }
    Reviewed {
        source: doc.source.clone(),
        request: doc.request.clone(),
        response,
        patched,
        profile: outcome.profile,
    }
}

impl Reviewed {
    /// The `--output json` line.
    pub fn to_json(&self) -> Value {
        json!({"source": self.source, "response": self.response.to_json(), "patched": self.patched})
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let r = &self.request;
        let name = match (r.name.as_str(), r.object()) {
            ("", Some(o)) => o
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
                .map_or_else(|| "(no name)".to_owned(), |g| format!("{g}*")),
            (n, _) => n.to_owned(),
        };
        let verdict = if self.response.allowed {
            "ALLOWED"
        } else {
            "DENIED"
        };
        let mut out = format!(
            "{}: {} {}/{}: {verdict}\n",
            self.source, r.kind, r.namespace, name
        );
        if let Some(p) = self.profile.filter(|_| self.response.allowed) {
            out.push_str(&format!("  profile: {p}\n"));
        }
        if !self.response.allowed {
            out.push_str("  reasons:\n");
            for reason in self.response.message.split("; ") {
                out.push_str(&format!("    - {reason}\n"));
            }
        }
        if !self.response.warnings.is_empty() {
            out.push_str("  warnings:\n");
            for w in &self.response.warnings {
                out.push_str(&format!("    - {w}\n"));
            }
        }
        match self.response.patch.as_ref().and_then(Value::as_array) {
            Some(ops) => {
                out.push_str(&format!("  patch ({} operations):\n", ops.len()));
                for op in ops {
                    out.push_str(&format!("    {op}\n"));
                }
            }
            None if self.response.allowed => out.push_str("  patch: none (nothing to change)\n"),
            None => {}
        }
        if let (Some(obj), Some(_)) = (&self.patched, &self.response.patch) {
            out.push_str("  patched object:\n");
            let yaml = serde_yaml::to_string(obj).unwrap_or_default();
            for line in yaml.lines() {
                out.push_str("    ");
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}
