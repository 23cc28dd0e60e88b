//! A small in-memory apiserver to build a `kube::Client` on: unit tests of `act` see the requests
//! rekey really sends and the answers a real apiserver gives (Status errors with their codes,
//! resourceVersion preconditions, immutable Secrets, dry runs, server-side apply field ownership),
//! without a cluster. Unlike a fixed tower-test script it holds state, so a test asserts on the
//! objects a step left behind rather than on the order of its requests.
//!
//! Served: get, list (label and field selectors), create, update (PUT), patch (merge, JSON patch,
//! apply), delete (finalizers honoured), the `status` subresource. Not served: watch, strategic
//! merge patch, admission, garbage collection. The client must be built inside a Tokio runtime
//! (kube's client spawns its buffer task).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use http::{Method, Request, Response, StatusCode, Uri};
use k8s_openapi::ByteString;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::json::{self as doc, Owners};

/// (kind path such as `api/v1/secrets`, namespace, name).
type ObjKey = (String, String, String);
/// An HTTP status and its JSON body.
type Reply = (u16, Value);

/// One request as the apiserver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    /// The Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: &'static str,
    /// Path and query as sent.
    pub path: String,
    /// Plural resource name, `secrets`, `deployments`; with `/status` for the subresource.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub content_type: Option<String>,
    pub field_manager: Option<String>,
    pub force: bool,
    pub dry_run: bool,
    /// The HTTP status answered; 0 when the connection was dropped instead.
    pub code: u16,
}

#[derive(Clone)]
enum Fault {
    Status(u16, String),
    /// The request takes effect but the connection drops before the answer.
    LoseResponse,
}

struct Injected {
    verb: String,
    resource: String,
    fault: Fault,
    once: bool,
}

/// What the service answers: a reply, or a dropped connection.
enum Answer {
    Reply(Reply),
    Dropped,
}

/// The parts of a request path.
struct Target {
    /// `api/v1` or `apis/<group>/<version>`.
    prefix: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Self> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let n = match segs.first() {
            Some(&"api") => 2,
            Some(&"apis") => 3,
            _ => return None,
        };
        let prefix = segs.get(..n)?.join("/");
        let mut rest = segs.get(n..)?;
        let mut namespace = None;
        if rest.len() >= 3 && rest[0] == "namespaces" {
            namespace = Some(rest[1].to_owned());
            rest = &rest[2..];
        }
        let owned = |i: usize| rest.get(i).map(|s| (*s).to_owned());
        Some(Self { prefix, plural: owned(0)?, namespace, name: owned(1), sub: owned(2) })
    }

    fn kind_path(&self) -> String {
        format!("{}/{}", self.prefix, self.plural)
    }

    fn resource(&self) -> String {
        match &self.sub {
            Some(s) => format!("{}/{s}", self.plural),
            None => self.plural.clone(),
        }
    }

    fn key(&self, name: &str) -> ObjKey {
        (self.kind_path(), self.namespace.clone().unwrap_or_default(), name.to_owned())
    }

    fn api_version(&self) -> String {
        self.prefix.trim_start_matches("apis/").trim_start_matches("api/").to_owned()
    }
}

/// A request, parsed.
struct Req {
    verb: &'static str,
    target: Target,
    query: BTreeMap<String, String>,
    content_type: String,
    body: Value,
}

impl Req {
    fn dry_run(&self) -> bool {
        self.query.get("dryRun").is_some_and(|v| v == "All") || self.body.get("dryRun") == Some(&json!(["All"]))
    }
    fn manager(&self) -> String {
        self.query.get("fieldManager").cloned().unwrap_or_else(|| "unknown".into())
    }
    fn name(&self) -> String {
        self.target.name.clone().unwrap_or_default()
    }
}

fn verb_of(method: &Method, t: &Target, query: &BTreeMap<String, String>) -> &'static str {
    match (method.as_str(), t.name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

/// A `Status` failure as the apiserver sends it.
fn status(code: u16, reason: &str, message: String, t: &Target) -> Reply {
    let details = json!({"name": t.name.clone().unwrap_or_default(), "kind": t.plural});
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "details": details, "code": code});
    (code, body)
}

fn not_found(t: &Target) -> Reply {
    status(404, "NotFound", format!("{} \"{}\" not found", t.plural, t.name.clone().unwrap_or_default()), t)
}

fn conflict(t: &Target, name: &str) -> Reply {
    let message = format!(
        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
        t.plural
    );
    status(409, "Conflict", message, t)
}

fn bad_request(t: &Target, message: String) -> Reply {
    status(400, "BadRequest", message, t)
}

fn invalid(t: &Target, message: String) -> Reply {
    status(422, "Invalid", message, t)
}

fn rv_of(v: &Value) -> Option<&str> {
    v.pointer("/metadata/resourceVersion").and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn kind_of(v: &Value) -> &str {
    v.get("kind").and_then(Value::as_str).unwrap_or_default()
}

fn meta(v: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !v.get("metadata").is_some_and(Value::is_object) {
        v["metadata"] = json!({});
    }
    match v.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

/// The precondition a body may carry: its resourceVersion must be the stored one.
fn precondition(t: &Target, old: &Value, body: &Value) -> Result<(), Reply> {
    match rv_of(body) {
        Some(rv) if Some(rv) != rv_of(old) => Err(conflict(t, &t.name.clone().unwrap_or_default())),
        _ => Ok(()),
    }
}

/// Secrets and ConfigMaps with `immutable: true` refuse any change to their content.
fn immutable_violation(old: &Value, new: &Value) -> Option<String> {
    if old.get("immutable") != Some(&Value::Bool(true)) {
        return None;
    }
    let name = old.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    ["data", "binaryData", "immutable"].into_iter().find(|f| old.get(*f) != new.get(*f)).map(|f| {
        format!("{} \"{name}\" is invalid: {f}: Forbidden: field is immutable when `immutable` is set", kind_of(old))
    })
}

/// What the apiserver does to every Secret it stores: stringData folded into data, an Opaque
/// type by default, empty maps dropped as protobuf drops them.
fn normalise(v: &mut Value) {
    if kind_of(v) == "Secret" {
        if let Some(Value::Object(s)) = v.as_object_mut().and_then(|o| o.remove("stringData")) {
            for (k, text) in s {
                let bytes = ByteString(text.as_str().unwrap_or_default().as_bytes().to_vec());
                v["data"][k] = serde_json::to_value(bytes).unwrap_or_default();
            }
        }
        if v.get("type").is_none() {
            v["type"] = json!("Opaque");
        }
    }
    let fields = [("", "data"), ("", "binaryData"), ("/metadata", "labels"), ("/metadata", "annotations")];
    for (parent, field) in fields.into_iter().chain([("/metadata", "finalizers")]) {
        if let Some(Value::Object(m)) = v.pointer_mut(parent)
            && m.get(field).is_some_and(|f| {
                f.is_null()
                    || f.as_object().is_some_and(serde_json::Map::is_empty)
                    || f.as_array().is_some_and(Vec::is_empty)
            })
        {
            m.remove(field);
        }
    }
}

/// Decodes known kinds into their types, as the apiserver does before anything else; a body
/// missing required fields is Invalid, one that does not decode (bad base64) a BadRequest.
fn decode_check(v: &Value) -> Result<(), (u16, String)> {
    fn check<K: DeserializeOwned>(v: &Value) -> Result<(), String> {
        serde_json::from_value::<K>(v.clone()).map(drop).map_err(|e| e.to_string())
    }
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core};
    let result = match kind_of(v) {
        "Secret" => check::<core::Secret>(v),
        "ConfigMap" => check::<core::ConfigMap>(v),
        "Pod" => check::<core::Pod>(v),
        "Deployment" => check::<apps::Deployment>(v),
        "StatefulSet" => check::<apps::StatefulSet>(v),
        "DaemonSet" => check::<apps::DaemonSet>(v),
        "IamKeyRotation" => check::<crate::api::IamKeyRotation>(v),
        _ => Ok(()),
    };
    result.map_err(|e| if e.contains("missing field") { (422, e) } else { (400, e) })
}

/// Kinds whose status is written only through the `status` subresource.
fn has_status_subresource(v: &Value) -> bool {
    !matches!(kind_of(v), "Secret" | "ConfigMap" | "Event" | "Lease" | "ServiceAccount")
}

/// The in-memory apiserver's state.
struct Store {
    objects: BTreeMap<ObjKey, Value>,
    owners: BTreeMap<ObjKey, Owners>,
    /// Like etcd's revision: one counter for every object.
    revision: u64,
    uids: u64,
    now: Timestamp,
    faults: Vec<Injected>,
    requests: Vec<Recorded>,
}

impl Store {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            owners: BTreeMap::new(),
            revision: 1000,
            uids: 0,
            now: Timestamp::from_second(1_736_935_200).unwrap_or(Timestamp::UNIX_EPOCH),
            faults: Vec::new(),
            requests: Vec::new(),
        }
    }

    fn fault(&mut self, verb: &str, resource: &str) -> Option<Fault> {
        let i = self.faults.iter().position(|f| f.verb == verb && f.resource == resource)?;
        let fault = self.faults[i].fault.clone();
        if self.faults[i].once {
            self.faults.remove(i);
        }
        Some(fault)
    }

    fn handle(&mut self, method: &Method, uri: &Uri, content_type: Option<String>, body: &[u8]) -> Answer {
        let Some(target) = Target::parse(uri.path()) else {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                "reason": "NotFound", "message": "the server could not find the requested resource"});
            return Answer::Reply((404, body));
        };
        let query: BTreeMap<String, String> =
            form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes()).into_owned().collect();
        let verb = verb_of(method, &target, &query);
        let parsed = if body.is_empty() {
            Ok(Value::Null)
        } else {
            // An apply body is YAML, which kube sends as JSON (a subset).
            serde_json::from_slice(body).or_else(|_| serde_saphyr::from_slice(body)).map_err(|e| e.to_string())
        };
        let mut rec = Recorded {
            method: method.to_string(),
            verb,
            path: uri.path_and_query().map(ToString::to_string).unwrap_or_default(),
            resource: target.resource(),
            namespace: target.namespace.clone(),
            name: target.name.clone(),
            content_type: content_type.clone(),
            field_manager: query.get("fieldManager").cloned(),
            force: query.get("force").is_some_and(|f| f == "true"),
            dry_run: false,
            code: 0,
        };
        let fault = self.fault(verb, &rec.resource);
        let answer = match parsed {
            Err(e) => Answer::Reply(bad_request(&target, format!("the body does not decode: {e}"))),
            Ok(body) => {
                let req = Req { verb, target, query, content_type: content_type.unwrap_or_default(), body };
                rec.dry_run = req.dry_run();
                self.answer(&req, fault)
            }
        };
        if let Answer::Reply((code, _)) = &answer {
            rec.code = *code;
        }
        self.requests.push(rec);
        answer
    }

    fn answer(&mut self, req: &Req, fault: Option<Fault>) -> Answer {
        match fault {
            Some(Fault::Status(403, reason)) => {
                let t = &req.target;
                let group = t.prefix.strip_prefix("apis/").and_then(|g| g.split('/').next()).unwrap_or_default();
                let qualified = if group.is_empty() { t.plural.clone() } else { format!("{}.{group}", t.plural) };
                let message = format!(
                    "{qualified} \"{}\" is forbidden: User \"system:serviceaccount:rekey:rekey\" cannot {} resource \"{}\" in API group \"{group}\" in the namespace \"{}\"",
                    req.name(),
                    req.verb,
                    t.resource(),
                    t.namespace.clone().unwrap_or_default()
                );
                Answer::Reply(status(403, &reason, message, t))
            }
            Some(Fault::Status(code, reason)) => {
                Answer::Reply(status(code, &reason, "injected by the test".into(), &req.target))
            }
            Some(Fault::LoseResponse) => {
                self.serve(req);
                Answer::Dropped
            }
            None => Answer::Reply(self.serve(req)),
        }
    }

    fn serve(&mut self, req: &Req) -> Reply {
        let t = &req.target;
        let result = match req.verb {
            "get" => self.objects.get(&t.key(&req.name())).cloned().map(|o| (200, o)).ok_or_else(|| not_found(t)),
            "list" => Ok(self.list(req)),
            "create" => self.create(req),
            "update" => self.update(req),
            "patch" => self.patch(req),
            "delete" => self.delete(req),
            verb => Err(status(405, "MethodNotAllowed", format!("the fake apiserver does not serve {verb}"), t)),
        };
        result.unwrap_or_else(|e| e)
    }

    fn list(&self, req: &Req) -> Reply {
        let t = &req.target;
        let labels = req.query.get("labelSelector").map(String::as_str).unwrap_or_default();
        let fields = req.query.get("fieldSelector").map(String::as_str).unwrap_or_default();
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((kp, ns, _), _)| *kp == t.kind_path() && t.namespace.as_ref().is_none_or(|want| want == ns))
            .map(|(_, o)| o)
            .filter(|o| matches_labels(o, labels) && matches_fields(o, fields))
            .cloned()
            .collect();
        let kind = items.first().map(|o| format!("{}List", kind_of(o))).unwrap_or_else(|| "List".into());
        let body = json!({"kind": kind, "apiVersion": t.api_version(),
            "metadata": {"resourceVersion": self.revision.to_string()}, "items": items});
        (200, body)
    }

    fn create(&mut self, req: &Req) -> Result<Reply, Reply> {
        let t = &req.target;
        let mut obj = req.body.clone();
        let ns = t.namespace.clone().unwrap_or_default();
        match obj.pointer("/metadata/namespace").and_then(Value::as_str) {
            Some(given) if given != ns => {
                return Err(bad_request(
                    t,
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
            _ => {}
        }
        if obj.pointer("/metadata/name").and_then(Value::as_str).is_none_or(str::is_empty) {
            let base = obj.pointer("/metadata/generateName").and_then(Value::as_str).map(str::to_owned);
            let Some(base) = base else {
                return Err(invalid(t, "metadata.name: Required value: name or generateName is required".into()));
            };
            meta(&mut obj).insert("name".into(), json!(format!("{base}{:05x}", self.uids + 1)));
        }
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_owned();
        if !ns.is_empty() {
            meta(&mut obj).insert("namespace".into(), json!(ns));
        }
        let key = t.key(&name);
        if self.objects.contains_key(&key) {
            return Err(status(409, "AlreadyExists", format!("{} \"{name}\" already exists", t.plural), t));
        }
        // The server assigns identity; a status is written through its subresource only.
        for field in ["uid", "resourceVersion", "creationTimestamp", "deletionTimestamp"] {
            meta(&mut obj).remove(field);
        }
        if has_status_subresource(&obj)
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        let obj = self.prepare(t, None, obj)?;
        let mut owners = Owners::new();
        doc::update(&mut owners, &json!({}), &obj, &req.manager());
        Ok((201, self.commit(key, obj, owners, req.dry_run())))
    }

    fn update(&mut self, req: &Req) -> Result<Reply, Reply> {
        let t = &req.target;
        let name = req.name();
        let old = self.objects.get(&t.key(&name)).cloned().ok_or_else(|| not_found(t))?;
        if req.body.pointer("/metadata/name").and_then(Value::as_str) != Some(name.as_str()) {
            return Err(bad_request(t, "the name of the object does not match the name on the URL".into()));
        }
        precondition(t, &old, &req.body)?;
        let new = self.scoped(t, &old, req.body.clone());
        self.write(req, &old, new, None)
    }

    fn patch(&mut self, req: &Req) -> Result<Reply, Reply> {
        let t = &req.target;
        let name = req.name();
        let stored = self.objects.get(&t.key(&name)).cloned();
        let ct = req.content_type.split(';').next().unwrap_or_default().trim();
        if ct == "application/apply-patch+yaml" {
            return self.apply(req, stored);
        }
        let old = stored.ok_or_else(|| not_found(t))?;
        let mut new = old.clone();
        match ct {
            "application/merge-patch+json" => {
                precondition(t, &old, &req.body)?;
                doc::merge_patch(&mut new, &req.body);
            }
            "application/json-patch+json" => doc::json_patch(&mut new, &req.body).map_err(|e| invalid(t, e))?,
            other => {
                return Err(status(415, "UnsupportedMediaType", format!("the fake does not serve {other}"), t));
            }
        }
        let new = self.scoped(t, &old, new);
        self.write(req, &old, new, None)
    }

    fn apply(&mut self, req: &Req, stored: Option<Value>) -> Result<Reply, Reply> {
        let t = &req.target;
        let name = req.name();
        let Some(manager) = req.query.get("fieldManager") else {
            return Err(bad_request(t, "fieldManager is required for apply requests".into()));
        };
        if req.body.get("apiVersion").is_none() || req.body.get("kind").is_none() {
            return Err(bad_request(t, "apiVersion and kind must be set in an apply body".into()));
        }
        if req.body.pointer("/metadata/name").and_then(Value::as_str) != Some(name.as_str()) {
            return Err(bad_request(t, "the name of the object does not match the name on the URL".into()));
        }
        let key = t.key(&name);
        let mut owners = self.owners.get(&key).cloned().unwrap_or_default();
        let skeleton = || {
            let ns = t.namespace.clone().unwrap_or_default();
            json!({"apiVersion": req.body["apiVersion"], "kind": req.body["kind"],
                "metadata": {"name": name, "namespace": ns}})
        };
        let mut new = stored.clone().unwrap_or_else(skeleton);
        if let Some(old) = &stored {
            precondition(t, old, &req.body)?;
        }
        let force = req.query.get("force").is_some_and(|f| f == "true");
        doc::apply(&mut owners, &mut new, &req.body, manager, force).map_err(|fields| {
            let message = format!("Apply failed with {} conflict(s): {}", fields.len(), fields.join(", "));
            status(409, "Conflict", message, t)
        })?;
        match stored {
            Some(old) => {
                let new = self.scoped(t, &old, new);
                self.write(req, &old, new, Some(owners))
            }
            None => {
                let obj = self.prepare(t, None, new)?;
                Ok((201, self.commit(key, obj, owners, req.dry_run())))
            }
        }
    }

    /// A write to the object keeps its status; a write to `status` changes nothing else.
    fn scoped(&self, t: &Target, old: &Value, mut new: Value) -> Value {
        let status_only = t.sub.as_deref() == Some("status");
        if status_only || has_status_subresource(old) {
            let (mut base, from) = if status_only { (old.clone(), &new) } else { (new.clone(), old) };
            match from.get("status") {
                Some(s) => base["status"] = s.clone(),
                None => {
                    base.as_object_mut().map(|o| o.remove("status"));
                }
            }
            new = base;
        }
        new
    }

    /// An update of an existing object, with its field ownership.
    fn write(&mut self, req: &Req, old: &Value, new: Value, owners: Option<Owners>) -> Result<Reply, Reply> {
        let key = req.target.key(&req.name());
        let new = self.prepare(&req.target, Some(old), new)?;
        let owners = owners.unwrap_or_else(|| {
            let mut o = self.owners.get(&key).cloned().unwrap_or_default();
            doc::update(&mut o, old, &new, &req.manager());
            o
        });
        Ok((200, self.commit(key, new, owners, req.dry_run())))
    }

    /// Validates `new` and sets the metadata the server owns. The resourceVersion is set by `commit`
    /// (and only when the object changed).
    fn prepare(&self, t: &Target, old: Option<&Value>, mut new: Value) -> Result<Value, Reply> {
        normalise(&mut new);
        if let Some(msg) = old.and_then(|o| immutable_violation(o, &new)) {
            return Err(invalid(t, msg));
        }
        decode_check(&new).map_err(|(code, msg)| if code == 422 { invalid(t, msg) } else { bad_request(t, msg) })?;
        let has_spec = new.get("spec").is_some();
        match old {
            Some(old) => {
                for field in ["uid", "creationTimestamp", "deletionTimestamp", "generation", "resourceVersion"] {
                    match old.pointer(&format!("/metadata/{field}")) {
                        Some(v) => meta(&mut new).insert(field.into(), v.clone()),
                        None => meta(&mut new).remove(field),
                    };
                }
                if has_spec && old.get("spec") != new.get("spec") {
                    let generation = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
                    meta(&mut new).insert("generation".into(), json!(generation + 1));
                }
            }
            None => {
                let m = meta(&mut new);
                m.insert("creationTimestamp".into(), json!(self.now.to_string()));
                if has_spec {
                    m.insert("generation".into(), json!(1));
                }
            }
        }
        Ok(new)
    }

    /// Stores `obj` (unless a dry run) with a new resourceVersion when it changed; an object being
    /// deleted goes once its last finalizer is removed.
    fn commit(&mut self, key: ObjKey, mut obj: Value, owners: Owners, dry_run: bool) -> Value {
        if dry_run || self.objects.get(&key) == Some(&obj) {
            return obj;
        }
        self.revision += 1;
        let m = meta(&mut obj);
        m.insert("resourceVersion".into(), json!(self.revision.to_string()));
        if !m.contains_key("uid") {
            self.uids += 1;
            m.insert("uid".into(), json!(format!("00000000-0000-4000-8000-{:012x}", self.uids)));
        }
        let finalizing = m.contains_key("deletionTimestamp")
            && m.get("finalizers").and_then(Value::as_array).is_none_or(Vec::is_empty);
        if finalizing {
            self.objects.remove(&key);
            self.owners.remove(&key);
        } else {
            self.objects.insert(key.clone(), obj.clone());
            self.owners.insert(key, owners);
        }
        obj
    }

    fn delete(&mut self, req: &Req) -> Result<Reply, Reply> {
        let t = &req.target;
        let key = t.key(&req.name());
        let old = self.objects.get(&key).cloned().ok_or_else(|| not_found(t))?;
        if let Some(rv) = req.body.pointer("/preconditions/resourceVersion").and_then(Value::as_str)
            && Some(rv) != rv_of(&old)
        {
            return Err(conflict(t, &req.name()));
        }
        let has_finalizers =
            old.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
        if has_finalizers {
            let mut new = old.clone();
            if new.pointer("/metadata/deletionTimestamp").is_none() {
                meta(&mut new).insert("deletionTimestamp".into(), json!(self.now.to_string()));
            }
            let owners = self.owners.get(&key).cloned().unwrap_or_default();
            return Ok((200, self.commit(key, new, owners, req.dry_run())));
        }
        if !req.dry_run() {
            self.objects.remove(&key);
            self.owners.remove(&key);
        }
        let uid = old.pointer("/metadata/uid").cloned().unwrap_or_default();
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": req.name(), "kind": t.plural, "uid": uid}});
        Ok((200, body))
    }
}

fn matches_labels(o: &Value, selector: &str) -> bool {
    let label = |k: &str| o.pointer("/metadata/labels").and_then(|l| l.get(k)).and_then(Value::as_str);
    selector.split(',').map(str::trim).filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            label(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            label(k.trim()) == Some(v.trim_start_matches('=').trim())
        } else if let Some(k) = term.strip_prefix('!') {
            label(k.trim()).is_none()
        } else {
            label(term).is_some()
        }
    })
}

fn matches_fields(o: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (path, want, equal) = match term.split_once("!=") {
            Some((p, w)) => (p, w, false),
            None => match term.split_once('=') {
                Some((p, w)) => (p, w.trim_start_matches('='), true),
                None => return false,
            },
        };
        let pointer = format!("/{}", path.replace('.', "/"));
        (o.pointer(&pointer).and_then(Value::as_str) == Some(want)) == equal
    })
}

/// The kind path (`api/v1/secrets`, `apis/apps/v1/deployments`) of a Kubernetes type.
pub fn kind_path<K: kube::Resource<DynamicType = ()>>() -> String {
    let av = K::api_version(&());
    let prefix = if av.contains('/') { format!("apis/{av}") } else { format!("api/{av}") };
    format!("{prefix}/{}", K::plural(&()))
}

/// The plural resource name the apiserver would use for a kind (regular English plurals only).
fn plural_of(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else if lower.ends_with('s') || lower.ends_with('x') || lower.ends_with("ch") {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

fn respond(answer: Answer) -> Result<Response<Body>, Box<dyn std::error::Error + Send + Sync>> {
    let Answer::Reply((code, body)) = answer else {
        return Err("connection closed before the response (injected)".into());
    };
    let mut res = Response::new(Body::from(serde_json::to_vec(&body)?));
    *res.status_mut() = StatusCode::from_u16(code)?;
    res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    Ok(res)
}

/// Handle on the fake apiserver; clones share it.
#[derive(Clone)]
pub struct FakeKube {
    store: Arc<Mutex<Store>>,
}

impl FakeKube {
    /// An empty apiserver and a client on it (default namespace `default`). Call inside a Tokio
    /// runtime.
    pub fn new() -> (FakeKube, kube::Client) {
        let fake = FakeKube { store: Arc::new(Mutex::new(Store::new())) };
        let store = fake.store.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let store = store.clone();
            async move {
                let (parts, body) = req.into_parts();
                let content_type =
                    parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let bytes = body.collect_bytes().await?;
                let answer = lock(&store).handle(&parts.method, &parts.uri, content_type, &bytes);
                respond(answer)
            }
        });
        let client = kube::Client::new(service, "default");
        (fake, client)
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Stores an object as if it had been there all along (a test's fixture): its status is kept,
    /// and the namespace defaults to `default`. Returns it as stored. Panics on an object the
    /// apiserver would refuse.
    pub fn put(&self, obj: impl serde::Serialize) -> Value {
        let mut obj = serde_json::to_value(obj).unwrap_or_default();
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("v1").to_owned();
        let prefix =
            if api_version.contains('/') { format!("apis/{api_version}") } else { format!("api/{api_version}") };
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default").to_owned();
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_owned();
        meta(&mut obj).insert("namespace".into(), json!(ns));
        let target = Target {
            prefix,
            plural: plural_of(kind_of(&obj)),
            namespace: Some(ns),
            name: Some(name.clone()),
            sub: None,
        };
        let key = target.key(&name);
        let mut st = self.lock();
        let old = st.objects.get(&key).cloned();
        let obj = match st.prepare(&target, old.as_ref(), obj) {
            Ok(o) => o,
            Err((_, status)) => panic!("put: the apiserver would refuse this object: {}", status["message"]),
        };
        let mut owners = st.owners.get(&key).cloned().unwrap_or_default();
        doc::update(&mut owners, old.as_ref().unwrap_or(&json!({})), &obj, "test");
        st.commit(key, obj, owners, false)
    }

    /// The stored object, e.g. `get(&kind_path::<Secret>(), "default", "creds")`.
    pub fn get(&self, kind_path: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&(kind_path.to_owned(), ns.to_owned(), name.to_owned())).cloned()
    }

    /// The stored object as its type.
    pub fn object<K>(&self, ns: &str, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        self.get(&kind_path::<K>(), ns, name).and_then(|v| serde_json::from_value(v).ok())
    }

    /// Removes an object outright (a human's `kubectl delete`, finalizers ignored).
    pub fn remove(&self, kind_path: &str, ns: &str, name: &str) {
        let key = (kind_path.to_owned(), ns.to_owned(), name.to_owned());
        let mut st = self.lock();
        st.objects.remove(&key);
        st.owners.remove(&key);
    }

    /// Which manager owns which fields of an object (`.data.AWS_ACCESS_KEY_ID`).
    pub fn owners(&self, kind_path: &str, ns: &str, name: &str) -> BTreeMap<String, Vec<String>> {
        let key = (kind_path.to_owned(), ns.to_owned(), name.to_owned());
        let st = self.lock();
        let owners = st.owners.get(&key).cloned().unwrap_or_default();
        owners.into_iter().map(|(m, fields)| (m, fields.iter().map(|f| doc::dotted(f)).collect())).collect()
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// The clock for creationTimestamp and deletionTimestamp.
    pub fn set_now(&self, now: Timestamp) {
        self.lock().now = now;
    }

    /// Every `verb` request on `resource` (plural, `deployments`; `iamkeyrotations/status` for a
    /// subresource) is answered with `code`/`reason`, until `clear_failures`.
    pub fn fail(&self, verb: &str, resource: &str, code: u16, reason: &str) {
        self.inject(verb, resource, Fault::Status(code, reason.to_owned()), false);
    }

    /// The next `verb` request on `resource` is answered with `code`/`reason`.
    pub fn fail_once(&self, verb: &str, resource: &str, code: u16, reason: &str) {
        self.inject(verb, resource, Fault::Status(code, reason.to_owned()), true);
    }

    /// The next `verb` request on `resource` takes effect but the connection drops before the
    /// answer (the client sees `kube::Error::Service`).
    pub fn lose_next_response(&self, verb: &str, resource: &str) {
        self.inject(verb, resource, Fault::LoseResponse, true);
    }

    fn inject(&self, verb: &str, resource: &str, fault: Fault, once: bool) {
        // A misspelt verb would never fire, and the test would pass for the wrong reason.
        const VERBS: [&str; 6] = ["get", "list", "create", "update", "patch", "delete"];
        assert!(VERBS.contains(&verb), "no verb {verb:?}; one of {VERBS:?}");
        let f = Injected { verb: verb.to_owned(), resource: resource.to_owned(), fault, once };
        self.lock().faults.push(f);
    }

    pub fn clear_failures(&self) {
        self.lock().faults.clear();
    }
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // A test that panicked holding the lock has failed already; the state stays readable.
    store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
#[path = "kube_tests.rs"]
mod tests;
