//! The `admission.k8s.io/v1` AdmissionReview envelope: strict parsing of what the API server
//! sends, and the response it expects back.
//!
//! The request is kept as the JSON it arrived as (policies see it unchanged); only the fields the
//! webhook needs are pulled out, so fields added by newer API servers are never lost.

use base64::Engine as _;
use serde_json::{json, Map, Value};

/// API version of the reviews this webhook speaks.
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// Why a body is not a usable AdmissionReview. Each becomes an HTTP 400 with this message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not JSON at all.
    #[error("body is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("body is not a JSON object")]
    NotObject,
    /// `apiVersion` is missing or not `admission.k8s.io/v1`.
    #[error("apiVersion must be \"admission.k8s.io/v1\", got {0}")]
    ApiVersion(String),
    /// `kind` is missing or not `AdmissionReview`.
    #[error("kind must be \"AdmissionReview\", got {0}")]
    Kind(String),
    /// No `request` object.
    #[error("request is missing or not an object")]
    NoRequest,
    /// A required request field is missing or has the wrong type.
    #[error("request.{field} is missing or not {expected}")]
    Field {
        /// The field, relative to `request`.
        field: &'static str,
        /// What it should be.
        expected: &'static str,
    },
}

/// The operation of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// An object is created.
    Create,
    /// An object is updated.
    Update,
    /// An object is deleted.
    Delete,
    /// A connection to a subresource (`exec`, `attach`, `portforward`, `proxy`).
    Connect,
}

impl Operation {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }
}

/// The parts of an AdmissionRequest the webhook reads, plus the request as it arrived.
#[derive(Debug, Clone)]
pub struct Request {
    /// `request.uid`, echoed in the response.
    pub uid: String,
    /// `request.kind.group`.
    pub group: String,
    /// `request.kind.kind`.
    pub kind: String,
    /// `request.resource.resource` (`pods`, `deployments`...).
    pub resource: String,
    /// `request.subResource`, empty when absent.
    pub sub_resource: String,
    /// `request.name`, empty on a CREATE with `generateName`.
    pub name: String,
    /// `request.namespace`, empty for cluster-scoped objects.
    pub namespace: String,
    /// `request.operation`.
    pub operation: Operation,
    /// `request.dryRun`.
    pub dry_run: bool,
    /// The whole `request` object, unchanged.
    pub raw: Value,
}

impl Request {
    /// `request.object`, when present and not null.
    pub fn object(&self) -> Option<&Value> {
        self.raw.get("object").filter(|v| v.is_object())
    }

    /// `request.oldObject`, when present and not null.
    pub fn old_object(&self) -> Option<&Value> {
        self.raw.get("oldObject").filter(|v| v.is_object())
    }

    /// `request.userInfo.groups`.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.raw
            .pointer("/userInfo/groups")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
    }
}

/// Parses a request body as an AdmissionReview v1.
pub fn parse(body: &[u8]) -> Result<Request, EnvelopeError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    from_value(value)
}

/// Checks an already parsed AdmissionReview and extracts its request.
pub fn from_value(value: Value) -> Result<Request, EnvelopeError> {
    let Value::Object(mut review) = value else {
        return Err(EnvelopeError::NotObject);
    };
    match review.get("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        other => return Err(EnvelopeError::ApiVersion(describe(other))),
    }
    match review.get("kind") {
        Some(Value::String(k)) if k == "AdmissionReview" => {}
        other => return Err(EnvelopeError::Kind(describe(other))),
    }
    let raw = match review.remove("request") {
        Some(v @ Value::Object(_)) => v,
        _ => return Err(EnvelopeError::NoRequest),
    };
    let text = |field: &'static str, pointer: &str, required: bool| match raw.pointer(pointer) {
        Some(Value::String(s)) if !(required && s.is_empty()) => Ok(s.clone()),
        None | Some(Value::Null) if !required => Ok(String::new()),
        _ => Err(EnvelopeError::Field {
            field,
            expected: "a non-empty string",
        }),
    };
    let uid = text("uid", "/uid", true)?;
    let kind = text("kind.kind", "/kind/kind", true)?;
    let group = text("kind.group", "/kind/group", false)?;
    let resource = text("resource.resource", "/resource/resource", false)?;
    let sub_resource = text("subResource", "/subResource", false)?;
    let name = text("name", "/name", false)?;
    let namespace = text("namespace", "/namespace", false)?;
    let operation = match raw.get("operation").and_then(Value::as_str) {
        Some("CREATE") => Operation::Create,
        Some("UPDATE") => Operation::Update,
        Some("DELETE") => Operation::Delete,
        Some("CONNECT") => Operation::Connect,
        _ => {
            return Err(EnvelopeError::Field {
                field: "operation",
                expected: "one of CREATE, UPDATE, DELETE, CONNECT",
            })
        }
    };
    let dry_run = match raw.get("dryRun") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(EnvelopeError::Field {
                field: "dryRun",
                expected: "a boolean",
            })
        }
    };
    for field in ["object", "oldObject"] {
        if !matches!(
            raw.get(field),
            None | Some(Value::Null) | Some(Value::Object(_))
        ) {
            let field = if field == "object" {
                "object"
            } else {
                "oldObject"
            };
            return Err(EnvelopeError::Field {
                field,
                expected: "an object or null",
            });
        }
    }
    Ok(Request {
        uid,
        group,
        kind,
        resource,
        sub_resource,
        name,
        namespace,
        operation,
        dry_run,
        raw,
    })
}

fn describe(v: Option<&Value>) -> String {
    match v {
        None => "nothing".into(),
        Some(v) => {
            let s = v.to_string();
            if s.len() > 64 {
                format!("{}...", &s[..s.floor_char_boundary(61)])
            } else {
                s
            }
        }
    }
}

/// What the webhook answers for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Echo of `request.uid`.
    pub uid: String,
    /// The verdict.
    pub allowed: bool,
    /// For a denial: the HTTP-like code (403 for policy, 500 for an evaluation fault).
    pub code: u16,
    /// For a denial: every reason, in one message.
    pub message: String,
    /// RFC 6902 operations, for an allow that changes the object.
    pub patch: Option<Value>,
    /// Warnings shown to the user (`kubectl` prints them).
    pub warnings: Vec<String>,
}

impl Response {
    /// An allow with no change.
    pub fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: true,
            code: 200,
            message: String::new(),
            patch: None,
            warnings: Vec::new(),
        }
    }

    /// A denial with a code and message.
    pub fn deny(uid: &str, code: u16, message: impl Into<String>) -> Self {
        Self {
            allowed: false,
            code,
            message: message.into(),
            ..Self::allow(uid)
        }
    }

    /// The `response` object as the API server expects it; the patch is a base64 string.
    pub fn to_json(&self) -> Value {
        let mut r = Map::new();
        r.insert("uid".into(), json!(self.uid));
        r.insert("allowed".into(), json!(self.allowed));
        if !self.allowed {
            r.insert(
                "status".into(),
                json!({
                    "status": "Failure",
                    "code": self.code,
                    "reason": reason_for(self.code),
                    "message": self.message,
                }),
            );
        }
        if let Some(patch) = &self.patch {
            let bytes = patch.to_string();
            r.insert("patchType".into(), json!("JSONPatch"));
            r.insert(
                "patch".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(bytes.as_bytes())),
            );
        }
        if !self.warnings.is_empty() {
            r.insert("warnings".into(), json!(self.warnings));
        }
        Value::Object(r)
    }

    /// The whole AdmissionReview answer.
    pub fn to_review(&self) -> Value {
        json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": self.to_json()})
    }
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        403 => "Forbidden",
        500 => "InternalError",
        _ => "Invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(request: Value) -> Vec<u8> {
        json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "request": request})
            .to_string()
            .into_bytes()
    }

    fn minimal() -> Value {
        json!({"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
               "resource": {"group": "", "version": "v1", "resource": "pods"},
               "operation": "CREATE", "object": {}})
    }

    #[test]
    fn parses_a_minimal_request_without_name() {
        let r = parse(&review(minimal())).unwrap();
        assert_eq!(
            (r.uid.as_str(), r.kind.as_str(), r.name.as_str()),
            ("u1", "Pod", "")
        );
        assert_eq!(r.operation, Operation::Create);
        assert!(!r.dry_run);
    }

    #[test]
    fn every_envelope_fault_has_its_own_error() {
        assert!(matches!(parse(b"{nope"), Err(EnvelopeError::NotJson(_))));
        assert_eq!(parse(b"[1]").unwrap_err(), EnvelopeError::NotObject);
        let wrong = json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"});
        assert!(matches!(
            parse(wrong.to_string().as_bytes()),
            Err(EnvelopeError::ApiVersion(_))
        ));
        let kind = json!({"apiVersion": API_VERSION, "kind": "Review", "request": minimal()});
        assert!(matches!(
            parse(kind.to_string().as_bytes()),
            Err(EnvelopeError::Kind(_))
        ));
        let none = json!({"apiVersion": API_VERSION, "kind": "AdmissionReview"});
        assert_eq!(
            parse(none.to_string().as_bytes()).unwrap_err(),
            EnvelopeError::NoRequest
        );
        let mut no_uid = minimal();
        no_uid.as_object_mut().unwrap().remove("uid");
        assert_eq!(
            parse(&review(no_uid)).unwrap_err(),
            EnvelopeError::Field {
                field: "uid",
                expected: "a non-empty string"
            }
        );
        let mut bad_op = minimal();
        bad_op["operation"] = json!("PATCH");
        assert!(matches!(
            parse(&review(bad_op)),
            Err(EnvelopeError::Field {
                field: "operation",
                ..
            })
        ));
        let mut bad_obj = minimal();
        bad_obj["object"] = json!("pod");
        assert!(matches!(
            parse(&review(bad_obj)),
            Err(EnvelopeError::Field {
                field: "object",
                ..
            })
        ));
    }

    #[test]
    fn response_encodes_patch_as_base64_and_denials_with_status() {
        let mut allow = Response::allow("u");
        allow.patch = Some(json!([{"op": "add", "path": "/a", "value": 1}]));
        let v = allow.to_json();
        assert_eq!(v["patchType"], "JSONPatch");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(v["patch"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&decoded).unwrap(),
            allow.patch.unwrap()
        );
        let deny = Response::deny("u", 403, "no").to_json();
        assert_eq!(deny["status"]["code"], 403);
        assert_eq!(deny["status"]["message"], "no");
        assert!(deny.get("patch").is_none());
    }
}
