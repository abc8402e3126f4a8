//! One admission review, from request to response: which path a request takes (fast path,
//! pod update, ephemeral containers, CONNECT, or the profile itself), the policy decision, the
//! mutation or the validation, and the answer.

use std::sync::Arc;

use agentvm_common::reload::Reloadable;
use serde_json::{json, Map, Value};

use crate::conformance;
use crate::keys::{ENFORCE_LABEL, KEY_PREFIX};
use crate::mutate;
use crate::patch;
use crate::policies::{Decision, Policies};
use crate::profile_name::Profile;
use crate::review::{Operation, Request, Response};
use crate::workload::{self, WorkloadKind};

/// Which endpoint a review came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/mutate`: fix what can be fixed, with a patch.
    Mutate,
    /// `/validate`: admit only what meets the profile.
    Validate,
}

impl Mode {
    /// `mutate` or `validate`, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Mutate => "mutate",
            Mode::Validate => "validate",
        }
    }
}

/// How a review ended, for logs and metrics (a small, fixed set of values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed without looking at policy: not an agent, excluded, DELETE, a subresource.
    Skipped,
    /// Allowed with no change.
    Allowed,
    /// Allowed with a patch.
    Patched,
    /// Denied by policy or profile.
    Denied,
    /// Denied because the request or the policy evaluation is broken (fail closed).
    Error,
}

impl Verdict {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Skipped => "skipped",
            Verdict::Allowed => "allowed",
            Verdict::Patched => "patched",
            Verdict::Denied => "denied",
            Verdict::Error => "error",
        }
    }
}

/// The answer and what led to it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What goes back to the API server.
    pub response: Response,
    /// How it ended.
    pub verdict: Verdict,
    /// The effective profile, when one was applied or checked.
    pub profile: Option<Profile>,
}

/// What a lookup of a CONNECT target found.
#[derive(Debug, Clone)]
pub enum Target {
    /// The pod as the cluster has it.
    Found(Value),
    /// No such pod (the API server will answer 404 itself).
    NotFound,
    /// The lookup could not be made (no cluster access, cache not synced...).
    Unknown(String),
}

/// What the cluster says about a request, looked up before the review (reviews themselves never
/// wait on the network).
#[derive(Debug, Clone)]
pub struct Facts {
    /// For a CONNECT review: what a lookup of its pod found.
    pub target: Target,
    /// Labels of the request's namespace; `None` when they could not be read.
    pub namespace_labels: Option<Map<String, Value>>,
}

impl Default for Facts {
    fn default() -> Self {
        Self {
            target: Target::Unknown("agentvm runs without cluster access".into()),
            namespace_labels: None,
        }
    }
}

/// Reviews admission requests with the policies in force.
#[derive(Debug, Clone)]
pub struct Reviewer {
    policies: Arc<Reloadable<Policies>>,
}

impl Reviewer {
    /// A reviewer over a (reloadable) policy set.
    pub fn new(policies: Arc<Reloadable<Policies>>) -> Self {
        Self { policies }
    }

    /// A reviewer over a fixed policy set.
    pub fn fixed(policies: Policies) -> Self {
        Self::new(Arc::new(Reloadable::new(policies)))
    }

    /// Reviews one request. A CONNECT review is decided without knowing its target pod; use
    /// [`Reviewer::review_with`] with what the cluster says.
    pub fn review(&self, mode: Mode, req: &Request) -> Outcome {
        self.review_with(mode, req, Facts::default())
    }

    /// Whether a request is a CONNECT to a pod that a lookup could inform, as `(namespace, name)`.
    pub fn connect_target(req: &Request) -> Option<(&str, &str)> {
        (req.operation == Operation::Connect && req.resource == "pods" && !req.name.is_empty())
            .then_some((req.namespace.as_str(), req.name.as_str()))
    }

    /// The policies in force.
    pub fn policies(&self) -> Arc<Policies> {
        self.policies.get()
    }

    /// Reviews one request with what the cluster said about it.
    pub fn review_with(&self, mode: Mode, req: &Request, facts: Facts) -> Outcome {
        let policies = self.policies.get();
        let enforced = facts
            .namespace_labels
            .as_ref()
            .and_then(|l| l.get(ENFORCE_LABEL))
            .and_then(Value::as_str)
            == Some("true");
        let ctx = Ctx {
            mode,
            req,
            policies: &policies,
            enforced,
            namespace_labels: facts.namespace_labels.map_or(Value::Null, Value::Object),
        };
        match req.operation {
            Operation::Delete => ctx.skip(),
            Operation::Connect => ctx.connect(facts.target),
            Operation::Create | Operation::Update => ctx.write(),
        }
    }
}

struct Ctx<'a> {
    mode: Mode,
    req: &'a Request,
    policies: &'a Policies,
    /// The namespace carries `agentvm.dev/enforce: "true"`: every pod in it is an agent.
    enforced: bool,
    namespace_labels: Value,
}

// The `Err` side of these helpers is the final answer of the review, returned early; boxing it
// would only add an allocation to the deny path.
#[allow(clippy::result_large_err)]
impl Ctx<'_> {
    fn skip(&self) -> Outcome {
        Outcome {
            response: Response::allow(&self.req.uid),
            verdict: Verdict::Skipped,
            profile: None,
        }
    }

    fn deny(&self, code: u16, messages: &[String], verdict: Verdict) -> Outcome {
        let response = Response::deny(&self.req.uid, code, messages.join("; "));
        Outcome {
            response,
            verdict,
            profile: None,
        }
    }

    fn fail(&self, message: String) -> Outcome {
        tracing::warn!(reason = %message, "review failed closed");
        self.deny(500, &[message], Verdict::Error)
    }

    fn namespace(&self) -> &str {
        if !self.req.namespace.is_empty() {
            return &self.req.namespace;
        }
        self.req
            .object()
            .and_then(|o| o.pointer("/metadata/namespace"))
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .unwrap_or("default")
    }

    fn excluded(&self) -> bool {
        self.policies.settings().is_excluded(self.namespace())
    }

    fn decide(&self, input: Value) -> Result<Decision, Outcome> {
        self.policies
            .decide(input)
            .map_err(|e| self.fail(format!("agentvm policy failed, denying (fail closed): {e}")))
    }

    fn input(&self, action: &str, pod: Value, workload: Value, target: Value) -> Value {
        json!({
            "request": self.req.raw,
            "action": action,
            "pod": pod,
            "workload": workload,
            "target": target,
            "namespace": {"name": self.namespace(), "labels": self.namespace_labels},
        })
    }

    /// Policy deny messages end the review; warnings come back with the decision.
    fn decide_or_deny(&self, input: Value) -> Result<Decision, Outcome> {
        let decision = self.decide(input)?;
        if decision.deny.is_empty() {
            Ok(decision)
        } else {
            Err(self.deny(403, &decision.deny, Verdict::Denied))
        }
    }

    fn allow_with(&self, warnings: Vec<String>) -> Outcome {
        let mut response = Response::allow(&self.req.uid);
        response.warnings = warnings;
        Outcome {
            response,
            verdict: Verdict::Allowed,
            profile: None,
        }
    }

    fn connect(&self, target: Target) -> Outcome {
        if self.req.resource != "pods" || self.excluded() {
            return self.skip();
        }
        let ns = self.namespace();
        let (pod, known, agent, why) = match target {
            Target::Found(pod) => {
                let agent = self.enforced || workload::is_agent(&pod, WorkloadKind::Pod);
                (pod, true, agent, String::new())
            }
            Target::NotFound => return self.skip(),
            Target::Unknown(why) => {
                tracing::debug!(reason = %why, "CONNECT target unknown");
                (Value::Null, false, false, why)
            }
        };
        if known && !agent {
            return self.skip();
        }
        let target = json!({"name": self.req.name, "namespace": ns, "known": known,
            "agent": agent, "unknown_reason": why});
        let input = self.input("connect", pod, Value::Null, target);
        match self.decide_or_deny(input) {
            Ok(d) => self.allow_with(d.warn),
            Err(out) => out,
        }
    }

    fn write(&self) -> Outcome {
        let req = self.req;
        let Some(kind) = WorkloadKind::from_group_kind(&req.group, &req.kind) else {
            return self.skip();
        };
        let is_pods = kind == WorkloadKind::Pod;
        if self.excluded() {
            return self.skip();
        }
        if is_pods && req.sub_resource == "ephemeralcontainers" {
            return self.ephemeral();
        }
        let status_update =
            is_pods && req.sub_resource == "status" && req.operation == Operation::Update;
        if !req.sub_resource.is_empty() && !status_update {
            return self.skip();
        }
        let Some(object) = req.object() else {
            let msg = format!(
                "request.object is missing for {} {}",
                req.operation.as_str(),
                req.kind
            );
            return self.deny(400, &[msg], Verdict::Error);
        };
        if is_pods && req.operation == Operation::Update {
            return self.pod_update(object, status_update);
        }
        if !workload::is_agent(object, kind) && !self.enforced {
            return self.skip();
        }
        if workload::made_by_controller(object, kind) {
            // A ReplicaSet of a Deployment, a Job of a CronJob: the owner's template is the one
            // to lock down, and the pods are reviewed when they are created. Changing the copy
            // would make the Deployment controller see a new template and create ReplicaSets
            // without end.
            return self.skip();
        }
        self.admit(object, kind)
    }

    fn ephemeral(&self) -> Outcome {
        let agent = [self.req.object(), self.req.old_object()]
            .into_iter()
            .flatten()
            .any(|o| workload::is_agent(o, WorkloadKind::Pod))
            || self.enforced;
        if !agent {
            return self.skip();
        }
        // Whatever policy allows, a debug container never gets at the proxy's files.
        let reach = self
            .req
            .object()
            .map(crate::proxy_mounts::debug_reach)
            .unwrap_or_default();
        if !reach.is_empty() {
            return self.deny(403, &reach, Verdict::Denied);
        }
        let pod = self.req.object().cloned().unwrap_or(Value::Null);
        let input = self.input("ephemeral", pod, Value::Null, Value::Null);
        match self.decide_or_deny(input) {
            Ok(d) => self.allow_with(d.warn),
            Err(out) => out,
        }
    }

    /// Pods are immutable where it matters: never patched on UPDATE, the `agentvm.dev/*`
    /// labels and annotations of an agent pod cannot change (that would escape the
    /// NetworkPolicy or fake a profile), and neither can the injected containers (an image swap
    /// would replace the proxy). A `pods/status` update (which can carry label changes) gets the
    /// same guard, without a policy evaluation: the kubelet sends many.
    fn pod_update(&self, object: &Value, status_only: bool) -> Outcome {
        let old = self.req.old_object();
        let agent = workload::is_agent(object, WorkloadKind::Pod)
            || old.is_some_and(|o| workload::is_agent(o, WorkloadKind::Pod))
            || self.enforced;
        if !agent {
            return self.skip();
        }
        let mut changed = Vec::new();
        for map in ["labels", "annotations"] {
            let ours = |o: Option<&Value>| -> Vec<(String, Value)> {
                o.and_then(|o| o.pointer(&format!("/metadata/{map}")))
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| k.starts_with(KEY_PREFIX))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
            let (before, after) = (ours(old), ours(Some(object)));
            let singular = &map[..map.len() - 1];
            for (k, v) in &before {
                match after.iter().find(|(k2, _)| k2 == k) {
                    None => changed.push(format!(
                        "{singular} {k} cannot be removed from an agent pod"
                    )),
                    Some((_, v2)) if v2 != v => {
                        changed.push(format!("{singular} {k} of an agent pod cannot be changed"));
                    }
                    Some(_) => {}
                }
            }
            for (k, _) in after
                .iter()
                .filter(|(k, _)| !before.iter().any(|(k2, _)| k2 == k))
            {
                changed.push(format!("{singular} {k} cannot be added to a running pod"));
            }
        }
        for name in crate::keys::RESERVED_CONTAINERS {
            let find = |o: Option<&Value>| {
                o.and_then(|o| o.get("spec"))
                    .and_then(Value::as_object)
                    .and_then(|spec| {
                        crate::podspec::containers(spec)
                            .find(|(_, c)| crate::podspec::name_of(c) == name)
                            .map(|(_, c)| c.clone())
                    })
            };
            if find(old) != find(Some(object)) {
                changed.push(format!(
                    "container {name} of an agent pod cannot be changed"
                ));
            }
        }
        if !changed.is_empty() {
            changed.push("recreate the pod instead".into());
            return self.deny(403, &changed, Verdict::Denied);
        }
        if status_only {
            return self.skip();
        }
        let pod = json!({"metadata": object.get("metadata"), "spec": object.get("spec")});
        let input = self.input("update", pod, Value::Null, Value::Null);
        match self.decide_or_deny(input) {
            Ok(d) => self.allow_with(d.warn),
            Err(out) => out,
        }
    }

    fn admit(&self, object: &Value, kind: WorkloadKind) -> Outcome {
        let tp = kind.template_pointer();
        let meta = object
            .pointer(&format!("{tp}/metadata"))
            .cloned()
            .unwrap_or_else(|| json!({}));
        let spec = match object.pointer(&format!("{tp}/spec")) {
            Some(s @ Value::Object(_)) => s.clone(),
            _ => {
                let msg = format!("{} has no pod spec at {tp}/spec", kind.name());
                return self.deny(400, &[msg], Verdict::Error);
            }
        };
        let workload = json!({
            "kind": kind.name(),
            "name": self.req.name,
            "namespace": self.namespace(),
            "template_path": tp,
        });
        let input = self.input(
            "admit",
            json!({"metadata": meta, "spec": spec}),
            workload,
            Value::Null,
        );
        let decision = match self.decide_or_deny(input) {
            Ok(d) => d,
            Err(out) => return out,
        };
        let profile = match decision.profile {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                return self.fail(format!("agentvm policy returned an invalid profile: {e}"))
            }
            None => {
                return self.fail(
                    "agentvm policy left data.agentvm.profile undefined, denying (fail closed)"
                        .into(),
                )
            }
        };
        let proxy = match decision.proxy {
            Ok(p) => p,
            Err(e) => {
                return self.fail(format!(
                    "agentvm policy returned an invalid data.agentvm.proxy, denying (fail \
                     closed): {e}"
                ))
            }
        };
        let extra_volumes: Vec<String> = object
            .pointer("/spec/volumeClaimTemplates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| {
                t.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect();
        let settings = self.policies.settings();
        let mut meta = into_map(meta);
        let mut spec = into_map(spec);

        if self.mode == Mode::Validate {
            let v =
                conformance::violations(&meta, &spec, profile, &proxy, settings, &extra_volumes);
            if !v.is_empty() {
                return self.deny(403, &v, Verdict::Denied).with_profile(profile);
            }
        }
        let original = (meta.clone(), spec.clone());
        let namespace = self.namespace();
        let applied = mutate::apply(&mut meta, &mut spec, profile, &proxy, settings, namespace);
        let mut denials = applied.denials;
        denials.extend(selector_mismatch(object, &meta));
        if !denials.is_empty() {
            return self
                .deny(403, &denials, Verdict::Denied)
                .with_profile(profile);
        }
        let v = conformance::violations(&meta, &spec, profile, &proxy, settings, &extra_volumes);
        if !v.is_empty() {
            return self.deny(403, &v, Verdict::Denied).with_profile(profile);
        }
        let mut warnings = decision.warn;
        warnings.extend(applied.warnings);
        let changed = (&meta, &spec) != (&original.0, &original.1);
        let mut out = self.allow_with(warnings);
        out.profile = Some(profile);
        match self.mode {
            Mode::Validate if changed => {
                let ops = patch::diff(
                    &json!({"metadata": original.0, "spec": original.1}),
                    &json!({"metadata": meta, "spec": spec}),
                );
                let paths: Vec<&str> = ops
                    .iter()
                    .filter_map(|o| o["path"].as_str())
                    .take(8)
                    .collect();
                let msg = format!(
                    "the pod does not match what the {profile} profile produces (differs at {}); \
                     send it through the agentvm mutating webhook",
                    paths.join(", ")
                );
                self.deny(403, &[msg], Verdict::Denied)
                    .with_profile(profile)
            }
            Mode::Validate => out,
            Mode::Mutate => {
                if changed {
                    let mut new = object.clone();
                    if let Some(slot) = pointer_slot(&mut new, tp) {
                        slot.insert("metadata".into(), Value::Object(meta));
                        slot.insert("spec".into(), Value::Object(spec));
                    }
                    out.response.patch = Some(Value::Array(patch::diff(object, &new)));
                    out.verdict = Verdict::Patched;
                }
                out
            }
        }
    }
}

impl Outcome {
    fn with_profile(mut self, profile: Profile) -> Self {
        self.profile = Some(profile);
        self
    }
}

/// A workload selector must still match its template after the labels agentvm sets.
fn selector_mismatch(object: &Value, meta: &Map<String, Value>) -> Vec<String> {
    let selector = object
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object);
    let labels = meta.get("labels").and_then(Value::as_object);
    selector
        .into_iter()
        .flatten()
        .filter(|(k, v)| k.starts_with(KEY_PREFIX) && labels.and_then(|l| l.get(*k)) != Some(*v))
        .map(|(k, v)| {
            format!("spec.selector.matchLabels {k}={v} would no longer match the template, where agentvm sets {k}: select on your own labels")
        })
        .collect()
}

fn into_map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The object at a JSON pointer that is known to lead to an object.
fn pointer_slot<'a>(root: &'a mut Value, pointer: &str) -> Option<&'a mut Map<String, Value>> {
    if pointer.is_empty() {
        root.as_object_mut()
    } else {
        root.pointer_mut(pointer).and_then(Value::as_object_mut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::shipped_sources;
    use agentvm_common::policy::Source;

    fn reviewer_with(settings_yaml: &str) -> Reviewer {
        let mut sources = shipped_sources();
        sources.push(Source::new(
            "data.yaml",
            format!("agentvm_settings:\n{settings_yaml}"),
        ));
        Reviewer::fixed(Policies::from_sources(sources, "test".into()).unwrap())
    }

    fn request(operation: &str, kind: (&str, &str), object: Value, old: Value) -> Request {
        let (group, kind) = kind;
        crate::review::from_value(json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": group, "version": "v1", "kind": kind},
                "resource": {"group": group, "version": "v1", "resource": "pods"},
                "namespace": "team-a", "name": "p", "operation": operation,
                "userInfo": {"username": "alice", "groups": ["devs"]},
                "object": object, "oldObject": old}
        }))
        .unwrap()
    }

    fn agent_pod(extra_labels: Value, spec: Value) -> Value {
        let mut labels = json!({"agentvm.dev/agent": "true"});
        for (k, v) in extra_labels.as_object().unwrap() {
            labels[k] = v.clone();
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": labels}, "spec": spec})
    }

    fn create(r: &Reviewer, object: Value) -> Outcome {
        r.review(
            Mode::Mutate,
            &request("CREATE", ("", "Pod"), object, Value::Null),
        )
    }

    #[test]
    fn credentials_deny_setting_names_every_secret() {
        let r = reviewer_with("  credentials: deny\n");
        let pod = agent_pod(
            json!({}),
            json!({"containers": [{"name": "a", "image": "i",
            "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "gh", "key": "token"}}}],
            "envFrom": [{"secretRef": {"name": "aws"}}]}]}),
        );
        let out = create(&r, pod);
        assert!(!out.response.allowed);
        assert!(
            out.response.message.contains("Secret gh"),
            "{}",
            out.response.message
        );
        assert!(
            out.response.message.contains("envFrom Secret aws"),
            "{}",
            out.response.message
        );
    }

    #[test]
    fn reserved_names_without_the_annotation_are_denied() {
        let r = reviewer_with("  {}\n");
        let pod = agent_pod(
            json!({}),
            json!({"containers": [{"name": "agentvm-proxy", "image": "evil"}]}),
        );
        let out = create(&r, pod);
        assert!(!out.response.allowed);
        assert!(
            out.response.message.contains("reserved"),
            "{}",
            out.response.message
        );
        let vol = agent_pod(
            json!({}),
            json!({"containers": [{"name": "a", "image": "i"}],
            "volumes": [{"name": "agentvm-workspace", "emptyDir": {}}]}),
        );
        assert!(!create(&r, vol).response.allowed);
    }

    #[test]
    fn sidecar_exec_shares_a_workspace_and_a_clash_is_denied() {
        let r = reviewer_with("  {}\n");
        let pod = agent_pod(
            json!({"agentvm.dev/profile": "sidecar-exec"}),
            json!({"containers": [{"name": "a", "image": "i"}]}),
        );
        let out = create(&r, pod);
        assert_eq!(out.profile, Some(Profile::SidecarExec));
        assert_eq!(out.verdict, Verdict::Patched);
        let clash = agent_pod(
            json!({"agentvm.dev/profile": "sidecar-exec"}),
            json!({
            "containers": [{"name": "a", "image": "i", "volumeMounts": [{"name": "data", "mountPath": "/workspace"}]}],
            "volumes": [{"name": "data", "emptyDir": {}}]}),
        );
        let out = create(&r, clash);
        assert!(!out.response.allowed);
        assert!(
            out.response.message.contains("/workspace"),
            "{}",
            out.response.message
        );
    }

    #[test]
    fn pod_updates_allow_unrelated_changes_and_guard_ours() {
        let r = reviewer_with("  {}\n");
        let old = agent_pod(
            json!({"agentvm.dev/egress": "deny", "app": "x"}),
            json!({"containers": []}),
        );
        let mut relabelled = old.clone();
        relabelled["metadata"]["labels"]["app"] = json!("y");
        let out = r.review(
            Mode::Mutate,
            &request("UPDATE", ("", "Pod"), relabelled, old.clone()),
        );
        assert!(out.response.allowed && out.response.patch.is_none());
        let mut escaped = old.clone();
        escaped["metadata"]["labels"]["agentvm.dev/egress"] = json!("allow");
        let out = r.review(
            Mode::Validate,
            &request("UPDATE", ("", "Pod"), escaped, old.clone()),
        );
        assert!(!out.response.allowed);
        assert!(out.response.message.contains("agentvm.dev/egress"));
        let plain = json!({"metadata": {"labels": {"app": "x"}}, "spec": {}});
        let mut promoted = plain.clone();
        promoted["metadata"]["labels"]["agentvm.dev/agent"] = json!("true");
        let out = r.review(
            Mode::Validate,
            &request("UPDATE", ("", "Pod"), promoted, plain),
        );
        assert!(
            !out.response.allowed,
            "an agent label cannot be put on a running pod"
        );
    }

    #[test]
    fn ephemeral_containers_follow_the_setting() {
        let pod = agent_pod(json!({}), json!({"containers": []}));
        let mut req = request("UPDATE", ("", "Pod"), pod.clone(), pod);
        req.sub_resource = "ephemeralcontainers".into();
        assert!(
            !reviewer_with("  {}\n")
                .review(Mode::Validate, &req)
                .response
                .allowed
        );
        let allowed = reviewer_with("  debug:\n    allow_ephemeral_containers: true\n");
        assert!(allowed.review(Mode::Validate, &req).response.allowed);
    }

    fn with_target(target: Target) -> Facts {
        Facts {
            target,
            ..Facts::default()
        }
    }

    fn in_namespace(labels: Value) -> Facts {
        Facts {
            namespace_labels: labels.as_object().cloned(),
            ..Facts::default()
        }
    }

    #[test]
    fn an_enforcing_namespace_makes_every_pod_an_agent() {
        let r = reviewer_with("  {}\n");
        // What `kubectl debug --copy-to` creates: a copy without the agent label.
        let copy = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "copy", "labels": {}},
            "spec": {"containers": [{"name": "a", "image": "i",
                "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}]}});
        let req = request("CREATE", ("", "Pod"), copy.clone(), Value::Null);
        assert_eq!(r.review(Mode::Mutate, &req).verdict, Verdict::Skipped);
        let enforce = in_namespace(json!({"agentvm.dev/enforce": "true"}));
        let out = r.review_with(Mode::Mutate, &req, enforce.clone());
        assert_eq!(out.verdict, Verdict::Patched, "{}", out.response.message);
        let validated = r.review_with(Mode::Validate, &req, enforce.clone());
        assert!(
            !validated.response.allowed,
            "the raw copy does not meet the profile"
        );
        let other = in_namespace(json!({"agentvm.dev/enforce": "false"}));
        assert_eq!(
            r.review_with(Mode::Mutate, &req, other).verdict,
            Verdict::Skipped
        );
        let connect = request("CONNECT", ("", "PodExecOptions"), json!({}), Value::Null);
        let facts = Facts {
            target: Target::Found(copy),
            ..enforce
        };
        assert!(
            !r.review_with(Mode::Validate, &connect, facts)
                .response
                .allowed
        );
    }

    #[test]
    fn policies_see_the_namespace_labels() {
        let mut sources = shipped_sources();
        sources.push(Source::new(
            "tier.rego",
            "package agentvm\n\ndeny contains \"no agents in prod\" if input.namespace.labels.tier == \"prod\"\n",
        ));
        let r = Reviewer::fixed(Policies::from_sources(sources, "t".into()).unwrap());
        let pod = agent_pod(
            json!({}),
            json!({"containers": [{"name": "a", "image": "i"}]}),
        );
        let req = request("CREATE", ("", "Pod"), pod, Value::Null);
        let prod = r.review_with(Mode::Mutate, &req, in_namespace(json!({"tier": "prod"})));
        assert_eq!(prod.response.message, "no agents in prod");
        assert!(
            r.review_with(Mode::Mutate, &req, in_namespace(json!({"tier": "dev"})))
                .response
                .allowed
        );
    }

    #[test]
    fn connect_is_decided_from_the_looked_up_pod_and_the_groups() {
        let r = Reviewer::fixed(Policies::shipped().unwrap());
        let connect = request(
            "CONNECT",
            ("", "PodExecOptions"),
            json!({"kind": "PodExecOptions"}),
            Value::Null,
        );
        let agent = Target::Found(agent_pod(json!({}), json!({})));
        let out = r.review_with(Mode::Validate, &connect, with_target(agent.clone()));
        assert!(!out.response.allowed);
        assert!(
            out.response.message.contains("into agent pod team-a/p"),
            "{}",
            out.response.message
        );
        let plain = Target::Found(json!({"metadata": {"labels": {}}}));
        assert_eq!(
            r.review_with(Mode::Validate, &connect, with_target(plain))
                .verdict,
            Verdict::Skipped
        );
        assert_eq!(
            r.review_with(Mode::Validate, &connect, with_target(Target::NotFound))
                .verdict,
            Verdict::Skipped
        );
        let mut sources = shipped_sources();
        sources.push(Source::new(
            "data.yaml",
            "agentvm_settings:\n  debug:\n    connect_allowed_groups: [devs]\n",
        ));
        let admins = Reviewer::fixed(Policies::from_sources(sources, "t".into()).unwrap());
        let allowed = admins.review_with(Mode::Validate, &connect, with_target(agent));
        assert!(allowed.response.allowed);
    }

    #[test]
    fn workload_updates_re_mutate_the_template_and_delete_is_skipped() {
        let r = reviewer_with("  {}\n");
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": {
                "metadata": {"labels": {"app": "a", "agentvm.dev/agent": "true"}},
                "spec": {"containers": [{"name": "a", "image": "i"}]}}}});
        let out = r.review(
            Mode::Mutate,
            &request(
                "UPDATE",
                ("apps", "Deployment"),
                deployment.clone(),
                deployment.clone(),
            ),
        );
        assert_eq!(out.verdict, Verdict::Patched);
        let out = r.review(
            Mode::Mutate,
            &request("DELETE", ("apps", "Deployment"), Value::Null, deployment),
        );
        assert_eq!(out.verdict, Verdict::Skipped);
    }

    /// The shipped policies without `proxy/`, plus `extra`.
    fn without_the_proxy_policy(extra: &str) -> Reviewer {
        let mut sources: Vec<Source> = shipped_sources()
            .into_iter()
            .filter(|s| !s.path.starts_with("proxy/"))
            .collect();
        sources.push(Source::new("mine.rego", extra));
        Reviewer::fixed(Policies::from_sources(sources, "t".into()).unwrap())
    }

    #[test]
    fn a_policy_set_without_a_proxy_rule_mounts_nothing_and_a_bad_one_fails_closed() {
        let pod = agent_pod(
            json!({}),
            json!({"containers": [{"name": "a", "image": "i"}]}),
        );
        // A copy of the policies made before `proxy` existed keeps working as it did.
        let old = without_the_proxy_policy("package agentvm\n");
        let out = create(&old, pod.clone());
        assert_eq!(out.verdict, Verdict::Patched, "{}", out.response.message);
        let patch = out.response.patch.unwrap().to_string();
        assert!(!patch.contains("agentvm-proxy-config"), "{patch}");
        assert!(
            patch.contains(r#""args":["proxy","--listen","127.0.0.1:7411"]"#),
            "{patch}"
        );
        for answer in [
            r#"{"config_map": "Bad_Name"}"#,
            r#"{"config_map": "a", "secret": "b"}"#,
            r#""agentvm-proxy""#,
        ] {
            let bad = without_the_proxy_policy(&format!("package agentvm\n\nproxy := {answer}\n"));
            let out = create(&bad, pod.clone());
            assert_eq!(
                (out.response.allowed, out.response.code),
                (false, 500),
                "{answer}"
            );
            assert!(
                out.response.message.contains("invalid data.agentvm.proxy"),
                "{answer}: {}",
                out.response.message
            );
        }
    }

    #[test]
    fn excluded_namespaces_match_by_exact_name() {
        let r = reviewer_with("  {}\n");
        let pod = agent_pod(json!({}), json!({"hostNetwork": true, "containers": []}));
        for (ns, skipped) in [
            ("kube-system", true),
            ("kube-system-extra", false),
            ("agentvm-system", true),
        ] {
            let mut req = request("CREATE", ("", "Pod"), pod.clone(), Value::Null);
            req.namespace = ns.into();
            let out = r.review(Mode::Mutate, &req);
            assert_eq!(out.verdict == Verdict::Skipped, skipped, "{ns}");
        }
    }
}
