//! JSON document operations of the fake apiserver: merge patch (RFC 7386), JSON patch (RFC 6902,
//! the operations kube's finalizer helper sends) and server-side apply's field ownership.
//!
//! Field ownership is kept per leaf (a scalar or a whole list; lists are atomic here, where the
//! real apiserver merges some by key). That is enough for what rekey relies on: an apply under a
//! manager removes the fields that manager applied before and omits now, unless another manager
//! also owns them, and never touches fields only others own.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// A field: the keys from the object's root.
pub type FieldPath = Vec<String>;
/// Manager name to the fields it owns.
pub type Owners = BTreeMap<String, BTreeSet<FieldPath>>;

/// Metadata the server sets: never owned by a manager.
const SYSTEM_METADATA: [&str; 9] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "managedFields",
    "generateName",
];

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let i = path.rfind('/').ok_or_else(|| format!("bad JSON pointer {path:?}"))?;
    Ok((&path[..i], unescape(&path[i + 1..])))
}

fn add_at(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let i = if last == "-" { a.len() } else { last.parse().map_err(|_| format!("bad index in {path}"))? };
            if i > a.len() {
                return Err(format!("index out of range in {path}"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("no parent for {path}")),
    }
}

fn remove_at(doc: &mut Value, path: &str) -> Result<(), String> {
    let (parent, last) = split_pointer(path)?;
    let removed = match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&last),
        Some(Value::Array(a)) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => Some(a.remove(i)),
            _ => None,
        },
        _ => None,
    };
    removed.map(drop).ok_or_else(|| format!("nothing to remove at {path}"))
}

/// RFC 6902 add, remove, replace and test.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch is an array of operations")?;
    for op in ops {
        let path = op.get("path").and_then(Value::as_str).ok_or("an operation without a path")?;
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        match op.get("op").and_then(Value::as_str) {
            Some("test") if doc.pointer(path) == Some(&value) => {}
            Some("test") => return Err(format!("test of {path} failed")),
            Some("add") => add_at(doc, path, value)?,
            Some("remove") => remove_at(doc, path)?,
            Some("replace") => {
                remove_at(doc, path)?;
                add_at(doc, path, value)?;
            }
            other => return Err(format!("unsupported operation {other:?}")),
        }
    }
    Ok(())
}

fn tracked(path: &[String]) -> bool {
    match path {
        [first, ..] if first == "apiVersion" || first == "kind" => false,
        [first, second, ..] if first == "metadata" => !SYSTEM_METADATA.contains(&second.as_str()),
        _ => true,
    }
}

fn collect(v: &Value, prefix: &mut FieldPath, out: &mut BTreeMap<FieldPath, Value>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                prefix.push(k.clone());
                collect(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Null => {}
        other if tracked(prefix) => {
            out.insert(prefix.clone(), other.clone());
        }
        _ => {}
    }
}

/// The fields a document sets, with their values.
pub fn leaves(v: &Value) -> BTreeMap<FieldPath, Value> {
    let mut out = BTreeMap::new();
    collect(v, &mut Vec::new(), &mut out);
    out
}

/// Removes a field, and the objects it leaves empty.
fn remove_path(v: &mut Value, path: &[String]) {
    let (Some((first, rest)), Some(m)) = (path.split_first(), v.as_object_mut()) else { return };
    if rest.is_empty() {
        m.remove(first);
        return;
    }
    if let Some(child) = m.get_mut(first) {
        remove_path(child, rest);
        if child.as_object().is_some_and(serde_json::Map::is_empty) {
            m.remove(first);
        }
    }
}

pub fn dotted(path: &[String]) -> String {
    format!(".{}", path.join("."))
}

/// Server-side apply of `body` by `manager` onto `current`. Err: the conflicting fields, when not
/// forced and another manager owns a field `body` sets to a different value.
pub fn apply(
    owners: &mut Owners,
    current: &mut Value,
    body: &Value,
    manager: &str,
    force: bool,
) -> Result<(), Vec<String>> {
    let applied = leaves(body);
    if !force {
        let now = leaves(current);
        let conflicts: Vec<String> = applied
            .iter()
            .filter(|(p, v)| now.get(*p) != Some(v))
            .filter(|(p, _)| owners.iter().any(|(m, fields)| m != manager && fields.contains(*p)))
            .map(|(p, _)| dotted(p))
            .collect();
        if !conflicts.is_empty() {
            return Err(conflicts);
        }
    }
    let before = owners.remove(manager).unwrap_or_default();
    for p in before.iter().filter(|p| !applied.contains_key(*p)) {
        if !owners.values().any(|fields| fields.contains(p)) {
            remove_path(current, p);
        }
    }
    merge_patch(current, body);
    if force {
        for fields in owners.values_mut() {
            fields.retain(|p| !applied.contains_key(p));
        }
    }
    owners.insert(manager.to_owned(), applied.into_keys().collect());
    prune(owners, current);
    Ok(())
}

/// A write other than apply: the fields it changed pass to `manager`.
pub fn update(owners: &mut Owners, old: &Value, new: &Value, manager: &str) {
    let before = leaves(old);
    let changed: BTreeSet<FieldPath> =
        leaves(new).into_iter().filter(|(p, v)| before.get(p) != Some(v)).map(|(p, _)| p).collect();
    for fields in owners.values_mut() {
        fields.retain(|p| !changed.contains(p));
    }
    owners.entry(manager.to_owned()).or_default().extend(changed);
    prune(owners, new);
}

/// Forgets fields that no longer exist.
fn prune(owners: &mut Owners, obj: &Value) {
    let present = leaves(obj);
    for fields in owners.values_mut() {
        fields.retain(|p| present.contains_key(p));
    }
    owners.retain(|_, fields| !fields.is_empty());
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_merges_objects_and_null_removes() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_tests_adds_and_removes_like_the_finalizer_helper() {
        let mut doc = json!({"metadata": {"finalizers": ["a/b"]}});
        let ops = json!([{"op": "test", "path": "/metadata/finalizers", "value": ["a/b"]},
            {"op": "remove", "path": "/metadata/finalizers/0"},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "c"}]);
        json_patch(&mut doc, &ops).unwrap();
        assert_eq!(doc, json!({"metadata": {"finalizers": ["c"]}}));
        assert!(json_patch(&mut doc, &json!([{"op": "test", "path": "/metadata/finalizers", "value": []}])).is_err());
    }

    #[test]
    fn apply_removes_only_what_the_manager_alone_applied_before() {
        let mut owners = Owners::new();
        let mut doc = json!({"metadata": {"name": "s"}, "data": {"theirs": "x"}});
        update(&mut owners, &json!({}), &doc, "human");
        apply(&mut owners, &mut doc, &json!({"data": {"id": "1", "secret": "2"}}), "rekey", true).unwrap();
        apply(&mut owners, &mut doc, &json!({"data": {"id": "1"}}), "rekey", true).unwrap();
        assert_eq!(doc["data"], json!({"theirs": "x", "id": "1"}));
        apply(&mut owners, &mut doc, &json!({"metadata": {"name": "s"}}), "rekey", true).unwrap();
        assert_eq!(doc["data"], json!({"theirs": "x"}));
        assert_eq!(
            apply(&mut owners, &mut doc, &json!({"data": {"theirs": "y"}}), "rekey", false),
            Err(vec![".data.theirs".to_owned()])
        );
    }
}
