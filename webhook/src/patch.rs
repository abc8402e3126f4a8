//! RFC 6902 patches computed as the difference between the object as it arrived and the object
//! as the profile wants it.
//!
//! The diff is deliberately simple so that every patch applies under strict RFC 6902 rules, the
//! way the API server applies it: members are added at their deepest existing parent (a missing
//! `labels` or `securityContext` is added whole), arrays whose length changed are replaced whole
//! (no index arithmetic, no ordering hazards), and every reference token is escaped.

use serde_json::{json, Map, Value};

/// Escapes one reference token for a JSON pointer (RFC 6901): `~` as `~0`, `/` as `~1`.
pub fn escape(token: &str) -> String {
    if token.contains(['~', '/']) {
        token.replace('~', "~0").replace('/', "~1")
    } else {
        token.to_owned()
    }
}

/// Operations that turn `from` into `to`. Applying them to `from` gives `to` exactly.
pub fn diff(from: &Value, to: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    diff_at(&mut String::new(), from, to, &mut ops);
    ops
}

fn diff_at(path: &mut String, from: &Value, to: &Value, ops: &mut Vec<Value>) {
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => diff_objects(path, a, b, ops),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                diff_at(path, x, y, ops);
                path.truncate(len);
            }
        }
        _ if from == to => {}
        _ => ops.push(json!({"op": "replace", "path": path.clone(), "value": to})),
    }
}

fn diff_objects(
    path: &mut String,
    a: &Map<String, Value>,
    b: &Map<String, Value>,
    ops: &mut Vec<Value>,
) {
    for (key, old) in a {
        let len = path.len();
        path.push('/');
        path.push_str(&escape(key));
        match b.get(key) {
            Some(new) => diff_at(path, old, new, ops),
            None => ops.push(json!({"op": "remove", "path": path.clone()})),
        }
        path.truncate(len);
    }
    for (key, new) in b {
        if !a.contains_key(key) {
            let p = format!("{path}/{}", escape(key));
            ops.push(json!({"op": "add", "path": p, "value": new}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn apply(doc: &Value, ops: &[Value]) -> Value {
        let mut doc = doc.clone();
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops.to_vec())).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        doc
    }

    #[test]
    fn escapes_tilde_and_slash() {
        assert_eq!(escape("agentvm.dev/egress"), "agentvm.dev~1egress");
        assert_eq!(escape("a~b/c"), "a~0b~1c");
        let from = json!({"metadata": {"labels": {"a~/b": "1"}}});
        let to = json!({"metadata": {"labels": {"a~/b": "2", "x/y": "3"}}});
        let ops = diff(&from, &to);
        assert_eq!(ops[0]["path"], "/metadata/labels/a~0~1b");
        assert_eq!(ops[1]["path"], "/metadata/labels/x~1y");
        assert_eq!(apply(&from, &ops), to);
    }

    #[test]
    fn missing_parents_are_added_whole() {
        let from = json!({"metadata": {}});
        let to = json!({"metadata": {"labels": {"a": "b"}}});
        assert_eq!(
            diff(&from, &to),
            vec![json!({"op": "add", "path": "/metadata/labels", "value": {"a": "b"}})]
        );
    }

    #[test]
    fn arrays_of_another_length_are_replaced_whole() {
        let from = json!({"v": [1, 2, 3]});
        let to = json!({"v": [1, 3]});
        assert_eq!(
            diff(&from, &to),
            vec![json!({"op": "replace", "path": "/v", "value": [1, 3]})]
        );
        assert!(diff(&to, &to).is_empty());
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
            "[a-z~/]{0,4}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-c~/.]{1,3}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn diff_always_applies_and_reaches_the_target(a in json_value(), b in json_value()) {
            let ops = diff(&a, &b);
            prop_assert_eq!(apply(&a, &ops), b.clone());
            prop_assert!(diff(&b, &b).is_empty());
        }
    }
}
