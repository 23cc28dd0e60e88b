//! An in-memory IAM and STS behind the [`Iam`] trait, faithful where rekey's safety depends on it:
//! the two-key quota, whole-second CreateDate, Inactive keys listed but refused by STS, slow
//! propagation of a new key, and failures (including a lost response) injected per operation.
//!
//! Every trait method maps errors exactly as `AwsIam` does (DeleteAccessKey and UntagUser treat
//! NoSuchEntity as done, ListUserTags turns it into `None`, STS rejections become
//! `Verification::Rejected`), so a test against this fake tests the contract rekey relies on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use secrecy::{ExposeSecret as _, SecretString};

use crate::error::Error;
use crate::iam::{Iam, Verification};
use crate::plan::IamKey;
use crate::secrets::AccessKey;

pub const ACCOUNT: &str = "123456789012";
/// IAM's quota of access keys per user.
pub const KEY_QUOTA: usize = 2;
/// IAM's quota of tags per user.
pub const TAG_QUOTA: usize = 50;
/// What STS answers for a key it refuses; `AwsIam::verify` turns exactly these into `Rejected`.
const REJECTIONS: [&str; 4] = ["InvalidClientTokenId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken"];
/// The operations a failure can be injected into (as AwsIam names them in its metrics).
pub const OPERATIONS: [&str; 9] = [
    "ListUserTags",
    "ListAccessKeys",
    "CreateAccessKey",
    "UpdateAccessKey",
    "DeleteAccessKey",
    "TagUser",
    "UntagUser",
    "GetAccessKeyLastUsed",
    "GetCallerIdentity",
];
const ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const SECRET_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// One IAM or STS call as rekey made it. Never holds secret material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub operation: &'static str,
    pub user: Option<String>,
    pub key_id: Option<String>,
    /// The remaining argument: `Active`/`Inactive` for UpdateAccessKey, `key=value` for TagUser,
    /// the tag key for UntagUser.
    pub detail: Option<String>,
    /// The role the call went through (a handle made by `for_role`); None for the operator's own.
    pub role: Option<String>,
    /// The error code AWS answered; None when it succeeded.
    pub error: Option<String>,
}

/// The role a handle made by `for_role` stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumedRole {
    pub role_arn: String,
    pub external_id: String,
    pub session: String,
}

struct Key {
    id: String,
    secret: String,
    active: bool,
    created: Timestamp,
    last_used: Option<Timestamp>,
    /// Verifications still to refuse before STS knows the key.
    unpropagated: u32,
}

#[derive(Default)]
struct User {
    tags: BTreeMap<String, String>,
    keys: Vec<Key>,
}

struct Injected {
    operation: String,
    code: String,
    /// None: every call.
    remaining: Option<u32>,
    /// The operation takes effect and only its answer is lost.
    after_effect: bool,
}

/// An AWS error answer: code and message.
type Fail = (String, String);

fn fail(code: &str, message: String) -> Fail {
    (code.to_owned(), message)
}

fn no_user(user: &str) -> Fail {
    fail("NoSuchEntity", format!("The user with name {user} cannot be found."))
}

struct State {
    now: Timestamp,
    users: BTreeMap<String, User>,
    /// IAM never reissues an access key id.
    issued: BTreeSet<String>,
    rng: u64,
    propagation: u32,
    failures: Vec<Injected>,
    calls: Vec<Call>,
    whoami: String,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn draw(rng: &mut u64, alphabet: &[u8], len: usize) -> String {
    (0..len).map(|_| char::from(alphabet[(splitmix(rng) % alphabet.len() as u64) as usize])).collect()
}

impl State {
    fn user(&mut self, name: &str) -> Result<&mut User, Fail> {
        self.users.get_mut(name).ok_or_else(|| no_user(name))
    }

    fn key(&mut self, user: &str, id: &str) -> Result<&mut Key, Fail> {
        self.user(user)?
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| fail("NoSuchEntity", format!("The Access Key with id {id} cannot be found.")))
    }

    fn mint(&mut self, user: &str, active: bool, unpropagated: u32) -> Result<(AccessKey, Timestamp), Fail> {
        if self.user(user)?.keys.len() >= KEY_QUOTA {
            return Err(fail("LimitExceeded", format!("Cannot exceed quota for AccessKeysPerUser: {KEY_QUOTA}")));
        }
        let id = loop {
            let id = format!("AKIA{}", draw(&mut self.rng, ID_ALPHABET, 16));
            if self.issued.insert(id.clone()) {
                break id;
            }
        };
        let secret = draw(&mut self.rng, SECRET_ALPHABET, 40);
        // IAM keeps CreateDate to the second: a created key is never "newer" than the instant it was made.
        let created = Timestamp::from_second(self.now.as_second()).unwrap_or(self.now);
        let key = Key { id: id.clone(), secret: secret.clone(), active, created, last_used: None, unpropagated };
        self.user(user)?.keys.push(key);
        Ok((AccessKey { id, secret: SecretString::from(secret) }, created))
    }

    fn verify(&mut self, key: &AccessKey) -> Verification {
        let found = self
            .users
            .iter_mut()
            .flat_map(|(name, u)| u.keys.iter_mut().map(move |k| (name, k)))
            .find(|(_, k)| k.id == key.id);
        match found {
            Some((_, k)) if !k.active => Verification::Rejected("InvalidClientTokenId".into()),
            // STS tells a known key signed with the wrong secret apart from an unknown key.
            Some((_, k)) if k.secret != key.secret.expose_secret() => {
                Verification::Rejected("SignatureDoesNotMatch".into())
            }
            Some((_, k)) if k.unpropagated > 0 => {
                k.unpropagated -= 1;
                Verification::Rejected("InvalidClientTokenId".into())
            }
            Some((name, _)) => Verification::Authenticated(format!("arn:aws:iam::{ACCOUNT}:user/{name}")),
            None => Verification::Rejected("InvalidClientTokenId".into()),
        }
    }

    /// The injected answer for a call of `operation`, consuming a one-shot injection.
    fn injected(&mut self, operation: &str) -> Option<(String, bool)> {
        let i = self.failures.iter().position(|f| f.operation == operation)?;
        let f = &mut self.failures[i];
        let out = (f.code.clone(), f.after_effect);
        match f.remaining.as_mut() {
            Some(1) => {
                self.failures.remove(i);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        Some(out)
    }
}

/// An in-memory IAM account. Clones share it.
#[derive(Clone)]
pub struct FakeIam {
    state: Arc<Mutex<State>>,
    role: Option<AssumedRole>,
}

impl Default for FakeIam {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeIam {
    /// An empty account. The clock starts at 2025-01-15T10:00:00.25Z: a fraction of a second, so
    /// that code mistaking "now" for a key's (truncated) CreateDate shows up.
    pub fn new() -> Self {
        let now = Timestamp::new(1_736_935_200, 250_000_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let state = State {
            now,
            users: BTreeMap::new(),
            issued: BTreeSet::new(),
            rng: 0x5EED,
            propagation: 0,
            failures: Vec::new(),
            calls: Vec::new(),
            whoami: format!("arn:aws:iam::{ACCOUNT}:user/rekey-operator"),
        };
        Self { state: Arc::new(Mutex::new(state)), role: None }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; its state is still readable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Logs a call, applies any injected failure, runs `op` and records its outcome.
    fn run<T>(
        &self,
        operation: &'static str,
        user: Option<&str>,
        key_id: Option<&str>,
        detail: Option<String>,
        op: impl FnOnce(&mut State) -> Result<T, Fail>,
    ) -> Result<T, Error> {
        let mut st = self.lock();
        let result = match st.injected(operation) {
            Some((code, false)) => Err(fail(&code, "injected failure".into())),
            Some((code, true)) => op(&mut st).and(Err(fail(&code, "injected failure after the effect".into()))),
            None => op(&mut st),
        };
        st.calls.push(Call {
            operation,
            user: user.map(str::to_owned),
            key_id: key_id.map(str::to_owned),
            detail,
            role: self.role.as_ref().map(|r| r.role_arn.clone()),
            error: result.as_ref().err().map(|(code, _)| code.clone()),
        });
        result.map_err(|(code, message)| Error::Iam { operation, code, message })
    }

    pub fn now(&self) -> Timestamp {
        self.lock().now
    }

    pub fn set_now(&self, now: Timestamp) {
        self.lock().now = now;
    }

    pub fn advance(&self, by: SignedDuration) {
        let mut st = self.lock();
        st.now = st.now.checked_add(by).unwrap_or(Timestamp::MAX);
    }

    /// Keys made by CreateAccessKey from now on are refused `n` times by STS before it knows them.
    pub fn set_propagation(&self, n: u32) {
        self.lock().propagation = n;
    }

    /// The ARN `whoami` answers for the operator's own handle.
    pub fn set_whoami(&self, arn: &str) {
        self.lock().whoami = arn.to_owned();
    }

    /// The next call of `operation` (e.g. "CreateAccessKey") fails with `code`, with no effect.
    pub fn fail_next(&self, operation: &str, code: &str) {
        self.inject(operation, code, Some(1), false);
    }

    /// Every call of `operation` fails with `code`, until `clear_failures`.
    pub fn fail_always(&self, operation: &str, code: &str) {
        self.inject(operation, code, None, false);
    }

    /// The next call of `operation` takes effect in IAM but its answer is lost: the caller sees `code`
    /// (a CreateAccessKey whose key exists while rekey never learnt its secret).
    pub fn lose_next_response(&self, operation: &str, code: &str) {
        self.inject(operation, code, Some(1), true);
    }

    fn inject(&self, operation: &str, code: &str, remaining: Option<u32>, after_effect: bool) {
        // A misspelt operation would never fire, and the test would pass for the wrong reason.
        assert!(OPERATIONS.contains(&operation), "no IAM operation {operation:?}; one of {OPERATIONS:?}");
        let f = Injected { operation: operation.to_owned(), code: code.to_owned(), remaining, after_effect };
        self.lock().failures.push(f);
    }

    pub fn clear_failures(&self) {
        self.lock().failures.clear();
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The operations called so far, oldest first.
    pub fn operations(&self) -> Vec<&'static str> {
        self.lock().calls.iter().map(|c| c.operation).collect()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The role this handle was made for by `for_role`.
    pub fn assumed(&self) -> Option<&AssumedRole> {
        self.role.as_ref()
    }

    pub fn add_user(&self, name: &str, tags: &[(&str, &str)]) {
        let tags = tags.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.lock().users.insert(name.to_owned(), User { tags, keys: Vec::new() });
    }

    /// A key made outside rekey (already propagated). Panics past the quota, which IAM enforces
    /// on everyone: a test cannot set up a user IAM would not allow.
    pub fn add_key(&self, user: &str, active: bool) -> String {
        match self.lock().mint(user, active, 0) {
            Ok((key, _)) => key.id,
            Err((code, message)) => panic!("add_key({user}): {code}: {message}"),
        }
    }

    /// The user's keys as ListAccessKeys shows them (empty for an unknown user); not logged.
    pub fn keys(&self, user: &str) -> Vec<IamKey> {
        let st = self.lock();
        st.users.get(user).map(|u| u.keys.iter().map(listed).collect()).unwrap_or_default()
    }

    /// A human's UpdateAccessKey, not logged. Panics on an unknown key.
    pub fn set_active(&self, user: &str, id: &str, active: bool) {
        match self.lock().key(user, id) {
            Ok(k) => k.active = active,
            Err((_, message)) => panic!("set_active({user}, {id}): {message}"),
        }
    }

    /// A human's DeleteAccessKey, not logged.
    pub fn remove_key(&self, user: &str, id: &str) {
        if let Some(u) = self.lock().users.get_mut(user) {
            u.keys.retain(|k| k.id != id);
        }
    }

    pub fn set_last_used(&self, id: &str, when: Option<Timestamp>) {
        let mut st = self.lock();
        if let Some(k) = st.users.values_mut().flat_map(|u| u.keys.iter_mut()).find(|k| k.id == id) {
            k.last_used = when;
        }
    }

    /// The key with its secret, as a test puts it into a Secret.
    pub fn secret_of(&self, id: &str) -> Option<AccessKey> {
        let st = self.lock();
        let k = st.users.values().flat_map(|u| u.keys.iter()).find(|k| k.id == id)?;
        Some(AccessKey { id: k.id.clone(), secret: SecretString::from(k.secret.clone()) })
    }

    pub fn tags(&self, user: &str) -> Option<BTreeMap<String, String>> {
        self.lock().users.get(user).map(|u| u.tags.clone())
    }
}

fn listed(k: &Key) -> IamKey {
    IamKey { id: k.id.clone(), active: k.active, created: k.created }
}

fn is_code(e: &Error, want: &str) -> bool {
    matches!(e, Error::Iam { code, .. } if code == want)
}

impl Iam for FakeIam {
    async fn for_role(&self, role_arn: &str, external_id: &str, session: &str) -> Self {
        let role = AssumedRole {
            role_arn: role_arn.to_owned(),
            external_id: external_id.to_owned(),
            session: session.to_owned(),
        };
        Self { state: self.state.clone(), role: Some(role) }
    }

    async fn user_tags(&self, user: &str) -> Result<Option<BTreeMap<String, String>>, Error> {
        match self.run("ListUserTags", Some(user), None, None, |st| Ok(st.user(user)?.tags.clone())) {
            Ok(tags) => Ok(Some(tags)),
            Err(e) if is_code(&e, "NoSuchEntity") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_keys(&self, user: &str) -> Result<Vec<IamKey>, Error> {
        self.run("ListAccessKeys", Some(user), None, None, |st| Ok(st.user(user)?.keys.iter().map(listed).collect()))
    }

    async fn create_key(&self, user: &str) -> Result<(AccessKey, Timestamp), Error> {
        self.run("CreateAccessKey", Some(user), None, None, |st| {
            let delay = st.propagation;
            st.mint(user, true, delay)
        })
    }

    async fn set_key_active(&self, user: &str, key_id: &str, active: bool) -> Result<(), Error> {
        let status = if active { "Active" } else { "Inactive" };
        self.run("UpdateAccessKey", Some(user), Some(key_id), Some(status.into()), |st| {
            st.key(user, key_id)?.active = active;
            Ok(())
        })
    }

    async fn delete_key(&self, user: &str, key_id: &str) -> Result<(), Error> {
        let result = self.run("DeleteAccessKey", Some(user), Some(key_id), None, |st| {
            st.key(user, key_id)?;
            st.user(user)?.keys.retain(|k| k.id != key_id);
            Ok(())
        });
        match result {
            Err(e) if is_code(&e, "NoSuchEntity") => Ok(()),
            other => other,
        }
    }

    async fn tag_user(&self, user: &str, key: &str, value: &str) -> Result<(), Error> {
        self.run("TagUser", Some(user), None, Some(format!("{key}={value}")), |st| {
            let tags = &mut st.user(user)?.tags;
            if !tags.contains_key(key) && tags.len() >= TAG_QUOTA {
                return Err(fail("LimitExceeded", format!("Cannot exceed quota for TagsPerUser: {TAG_QUOTA}")));
            }
            tags.insert(key.to_owned(), value.to_owned());
            Ok(())
        })
    }

    async fn untag_user(&self, user: &str, key: &str) -> Result<(), Error> {
        let result = self.run("UntagUser", Some(user), None, Some(key.to_owned()), |st| {
            st.user(user)?.tags.remove(key);
            Ok(())
        });
        match result {
            Err(e) if is_code(&e, "NoSuchEntity") => Ok(()),
            other => other,
        }
    }

    async fn last_used(&self, key_id: &str) -> Result<Option<Timestamp>, Error> {
        self.run("GetAccessKeyLastUsed", None, Some(key_id), None, |st| {
            st.users
                .values()
                .flat_map(|u| u.keys.iter())
                .find(|k| k.id == key_id)
                .map(|k| k.last_used)
                .ok_or_else(|| fail("NoSuchEntity", format!("The Access Key with id {key_id} cannot be found.")))
        })
    }

    /// The region goes into the call log's detail, so a test sees where verification was sent.
    async fn verify(&self, key: &AccessKey, region: &str) -> Result<Verification, Error> {
        match self.run("GetCallerIdentity", None, Some(&key.id), Some(region.to_owned()), |st| Ok(st.verify(key))) {
            Err(Error::Iam { code, .. }) if REJECTIONS.contains(&code.as_str()) => Ok(Verification::Rejected(code)),
            other => other,
        }
    }

    async fn whoami(&self) -> Result<String, Error> {
        let role = self.role.clone();
        self.run("GetCallerIdentity", None, None, None, |st| {
            Ok(match role {
                Some(r) => {
                    let name = r.role_arn.rsplit('/').next().unwrap_or_default();
                    let account = r.role_arn.split(':').nth(4).unwrap_or(ACCOUNT);
                    format!("arn:aws:sts::{account}:assumed-role/{name}/{}", r.session)
                }
                None => st.whoami.clone(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iam_with_user() -> FakeIam {
        let iam = FakeIam::new();
        iam.add_user("app", &[("team", "billing")]);
        iam
    }

    fn code(r: Result<impl std::fmt::Debug, Error>) -> String {
        match r {
            Err(Error::Iam { code, .. }) => code,
            other => panic!("expected an IAM error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_third_key_exceeds_the_quota_until_one_is_deleted() {
        let iam = iam_with_user();
        let old = iam.add_key("app", true);
        iam.create_key("app").await.unwrap();
        let err = iam.create_key("app").await.unwrap_err();
        assert!(matches!(&err, Error::Iam { operation: "CreateAccessKey", code, .. } if code == "LimitExceeded"));
        iam.delete_key("app", &old).await.unwrap();
        iam.create_key("app").await.unwrap();
        assert_eq!(iam.keys("app").len(), 2);
    }

    #[tokio::test]
    async fn keys_are_unique_iam_shaped_and_created_on_the_whole_second() {
        let iam = iam_with_user();
        iam.set_now(Timestamp::new(1_700_000_000, 999_000_000).unwrap());
        let (a, created) = iam.create_key("app").await.unwrap();
        assert_eq!(created, Timestamp::from_second(1_700_000_000).unwrap());
        assert_eq!(iam.keys("app")[0].created, created);
        iam.delete_key("app", &a.id).await.unwrap();
        let (b, _) = iam.create_key("app").await.unwrap();
        for k in [&a, &b] {
            assert!(k.id.len() == 20 && k.id.starts_with("AKIA"));
            assert!(k.id.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()));
            assert_eq!(k.secret.expose_secret().len(), 40);
        }
        assert_ne!(a.id, b.id);
        assert_eq!(iam.secret_of(&b.id).unwrap().secret.expose_secret(), b.secret.expose_secret());
    }

    #[tokio::test]
    async fn inactive_deleted_unknown_and_wrong_keys_do_not_authenticate() {
        let iam = iam_with_user();
        let id = iam.add_key("app", true);
        let key = iam.secret_of(&id).unwrap();
        let arn = format!("arn:aws:iam::{ACCOUNT}:user/app");
        assert_eq!(iam.verify(&key, "us-east-1").await.unwrap(), Verification::Authenticated(arn));
        let wrong = AccessKey { id: id.clone(), secret: SecretString::from("x".repeat(40)) };
        assert_eq!(
            iam.verify(&wrong, "us-east-1").await.unwrap(),
            Verification::Rejected("SignatureDoesNotMatch".into())
        );
        iam.set_active("app", &id, false);
        let listed = iam.list_keys("app").await.unwrap();
        assert!(listed.len() == 1 && !listed[0].active, "an Inactive key is still listed");
        let refused = Verification::Rejected("InvalidClientTokenId".into());
        assert_eq!(iam.verify(&key, "us-east-1").await.unwrap(), refused);
        iam.delete_key("app", &id).await.unwrap();
        assert_eq!(iam.verify(&key, "us-east-1").await.unwrap(), refused);
        let unknown = AccessKey { id: "AKIAUNKNOWN000000000".into(), secret: SecretString::from("s".to_owned()) };
        assert_eq!(iam.verify(&unknown, "us-east-1").await.unwrap(), refused);
    }

    #[tokio::test]
    async fn a_new_key_is_refused_until_it_has_propagated() {
        let iam = iam_with_user();
        iam.set_propagation(2);
        let (key, _) = iam.create_key("app").await.unwrap();
        for _ in 0..2 {
            assert_eq!(
                iam.verify(&key, "us-east-1").await.unwrap(),
                Verification::Rejected("InvalidClientTokenId".into())
            );
        }
        assert!(matches!(iam.verify(&key, "us-east-1").await.unwrap(), Verification::Authenticated(_)));
    }

    #[tokio::test]
    async fn injected_failures_fire_once_always_or_after_the_effect() {
        let iam = iam_with_user();
        iam.fail_next("CreateAccessKey", "ServiceFailure");
        assert_eq!(code(iam.create_key("app").await), "ServiceFailure");
        assert!(iam.keys("app").is_empty(), "a failed create made no key");
        iam.lose_next_response("CreateAccessKey", "Timeout");
        assert_eq!(code(iam.create_key("app").await), "Timeout");
        assert_eq!(iam.keys("app").len(), 1, "the lost create made its key");
        iam.fail_always("ListAccessKeys", "Throttling");
        for _ in 0..3 {
            assert_eq!(code(iam.list_keys("app").await), "Throttling");
        }
        iam.clear_failures();
        iam.list_keys("app").await.unwrap();
        // Mapped as AwsIam maps them: a rejection code from STS is an answer, not an error.
        iam.fail_next("GetCallerIdentity", "ExpiredToken");
        let key = iam.secret_of(&iam.keys("app")[0].id).unwrap();
        assert_eq!(iam.verify(&key, "us-east-1").await.unwrap(), Verification::Rejected("ExpiredToken".into()));
        iam.fail_next("DeleteAccessKey", "NoSuchEntity");
        iam.delete_key("app", &key.id).await.unwrap();
    }

    #[tokio::test]
    async fn missing_users_and_keys_answer_as_the_trait_promises() {
        let iam = iam_with_user();
        assert_eq!(iam.user_tags("nobody").await.unwrap(), None);
        assert_eq!(code(iam.list_keys("nobody").await), "NoSuchEntity");
        assert_eq!(code(iam.create_key("nobody").await), "NoSuchEntity");
        assert_eq!(code(iam.set_key_active("app", "AKIAMISSING000000000", false).await), "NoSuchEntity");
        assert_eq!(code(iam.last_used("AKIAMISSING000000000").await), "NoSuchEntity");
        iam.delete_key("app", "AKIAMISSING000000000").await.unwrap();
        iam.untag_user("nobody", "k").await.unwrap();
        assert_eq!(code(iam.tag_user("nobody", "k", "v").await), "NoSuchEntity");
    }

    #[tokio::test]
    async fn the_tag_quota_is_enforced_but_overwriting_a_tag_is_not_a_new_one() {
        let iam = iam_with_user();
        for i in 1..TAG_QUOTA {
            iam.tag_user("app", &format!("k{i}"), "v").await.unwrap();
        }
        assert_eq!(code(iam.tag_user("app", "one-too-many", "v").await), "LimitExceeded");
        iam.tag_user("app", "team", "payments").await.unwrap();
        assert_eq!(iam.user_tags("app").await.unwrap().unwrap()["team"], "payments");
    }

    #[tokio::test]
    async fn the_call_log_keeps_order_and_arguments_but_no_secret() {
        let iam = iam_with_user();
        let (key, _) = iam.create_key("app").await.unwrap();
        iam.list_keys("app").await.unwrap();
        iam.set_key_active("app", &key.id, false).await.unwrap();
        iam.verify(&key, "us-east-1").await.unwrap();
        assert_eq!(iam.operations(), ["CreateAccessKey", "ListAccessKeys", "UpdateAccessKey", "GetCallerIdentity"]);
        let calls = iam.calls();
        assert_eq!(calls[2].key_id.as_deref(), Some(key.id.as_str()));
        assert_eq!(calls[2].detail.as_deref(), Some("Inactive"));
        assert!(!format!("{calls:?}").contains(key.secret.expose_secret()));
        assert!(!iam.operations().contains(&"DeleteAccessKey"));
    }

    #[tokio::test]
    async fn a_role_handle_shares_the_account_and_is_recorded() {
        let iam = iam_with_user();
        let other = iam.for_role("arn:aws:iam::210987654321:role/rekey", "ext", "rekey-ns-r").await;
        assert_eq!(other.assumed().unwrap().external_id, "ext");
        other.create_key("app").await.unwrap();
        assert_eq!(iam.keys("app").len(), 1);
        assert_eq!(iam.calls()[0].role.as_deref(), Some("arn:aws:iam::210987654321:role/rekey"));
        assert_eq!(other.whoami().await.unwrap(), "arn:aws:sts::210987654321:assumed-role/rekey/rekey-ns-r");
        iam.set_whoami("arn:aws:iam::123456789012:user/op");
        assert_eq!(iam.whoami().await.unwrap(), "arn:aws:iam::123456789012:user/op");
    }
}
