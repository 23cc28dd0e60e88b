//! IAM and STS: the trait the reconcile uses, and its one implementation on the AWS SDK.
//! Everything here TOUCHES AWS.
//!
//! The SDK's standard retry (exponential backoff with jitter) covers throttling and 5xx for every
//! call except CreateAccessKey: a create retried after a lost response would mint a second key,
//! so that call is sent once and a failure is left to the write-ahead recovery.

use std::collections::BTreeMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;

use aws_config::retry::RetryConfig;
use aws_credential_types::Credentials;
use aws_sdk_iam::error::ProvideErrorMetadata as _;
use aws_sdk_iam::types::StatusType;
use k8s_openapi::jiff::Timestamp;
use secrecy::{ExposeSecret as _, SecretString};

use crate::budget::{Budget, Budgets};
use crate::error::Error;
use crate::plan::snapshot::IamKey;
use crate::secrets::AccessKey;

/// What a verification attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Authenticated as this ARN.
    Authenticated(String),
    /// Rejected by STS (not yet propagated, or wrong).
    Rejected(String),
}

/// The IAM and STS operations rekey needs.
pub trait Iam: Send + Sync + Clone {
    /// The same operations through `role_arn`, assumed with `external_id`; credentials are cached
    /// and refreshed shortly before they expire.
    fn for_role(&self, role_arn: &str, external_id: &str, session: &str) -> impl Future<Output = Self> + Send;
    /// ListUserTags; Ok(None) when the user does not exist.
    fn user_tags(&self, user: &str) -> impl Future<Output = Result<Option<BTreeMap<String, String>>, Error>> + Send;
    fn list_keys(&self, user: &str) -> impl Future<Output = Result<Vec<IamKey>, Error>> + Send;
    /// Sent exactly once (no SDK retries).
    fn create_key(&self, user: &str) -> impl Future<Output = Result<(AccessKey, Timestamp), Error>> + Send;
    fn set_key_active(&self, user: &str, key_id: &str, active: bool) -> impl Future<Output = Result<(), Error>> + Send;
    fn delete_key(&self, user: &str, key_id: &str) -> impl Future<Output = Result<(), Error>> + Send;
    fn tag_user(&self, user: &str, key: &str, value: &str) -> impl Future<Output = Result<(), Error>> + Send;
    fn untag_user(&self, user: &str, key: &str) -> impl Future<Output = Result<(), Error>> + Send;
    /// GetAccessKeyLastUsed: None when never used.
    fn last_used(&self, key_id: &str) -> impl Future<Output = Result<Option<Timestamp>, Error>> + Send;
    /// sts:GetCallerIdentity signed with `key`, sent to STS in `region`.
    fn verify(&self, key: &AccessKey, region: &str) -> impl Future<Output = Result<Verification, Error>> + Send;
    /// The ARN the operator itself runs as.
    fn whoami(&self) -> impl Future<Output = Result<String, Error>> + Send;
    /// The same operations, served before routine ones (an emergency rotation: a leaked key).
    fn urgent(&self) -> Self {
        self.clone()
    }
    /// The same operations, served in turn (an emergency rotation once the leaked key is off).
    fn routine(&self) -> Self {
        self.clone()
    }
    /// Whether a leaked key's calls wait for this client's AWS account now: a reconcile about to
    /// make routine calls gives its slot up rather than hold it while they go first.
    fn urgent_waiting(&self) -> bool {
        false
    }
}

/// The AWS SDK implementation (aws-config's default chain; honours AWS_ENDPOINT_URL).
#[derive(Clone)]
pub struct AwsIam {
    sdk: aws_config::SdkConfig,
    iam: aws_sdk_iam::Client,
    iam_once: aws_sdk_iam::Client,
    /// Calls per second, per AWS account, protecting each account's API quota (crate::budget).
    budgets: Arc<Budgets>,
    /// This client's account's IAM budget, and its STS one (verification: another service's quota).
    account: Arc<Budget>,
    sts: Arc<Budget>,
    /// Served before routine calls.
    urgent: bool,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl AwsIam {
    /// `per_account` calls per second to each AWS account, at most `ceiling` to all together.
    pub fn new(sdk: aws_config::SdkConfig, per_account: NonZeroU32, ceiling: Option<NonZeroU32>) -> Self {
        let once = aws_sdk_iam::config::Builder::from(&sdk).retry_config(RetryConfig::disabled()).build();
        let budgets = Arc::new(Budgets::new(per_account, ceiling));
        Self {
            iam: aws_sdk_iam::Client::new(&sdk),
            iam_once: aws_sdk_iam::Client::from_conf(once),
            sdk,
            account: budgets.account(""),
            sts: budgets.account("sts:"),
            budgets,
            urgent: false,
            metrics: None,
        }
    }

    /// Standard retry (exponential backoff with jitter) for throttling and 5xx, 5 attempts.
    pub async fn from_env(per_account: NonZeroU32, ceiling: Option<NonZeroU32>) -> Self {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(5))
            .load()
            .await;
        Self::new(sdk, per_account, ceiling)
    }

    /// One IAM call: waits for the account's budget, then counts the outcome.
    async fn call<T>(&self, operation: &'static str, fut: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        self.call_within(&self.account, operation, fut).await
    }

    async fn call_within<T>(
        &self,
        budget: &Budget,
        operation: &'static str,
        fut: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        self.budgets.acquire(budget, self.urgent).await;
        let result = fut.await;
        if let Some(m) = &self.metrics {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(Error::Iam { code, .. }) => code.as_str(),
                Err(_) => "error",
            };
            m.aws_call(operation, outcome);
        }
        result
    }

    /// Counts every call in these metrics.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

/// Where and when a key was last used (GetAccessKeyLastUsed in full; `rekey audit` shows it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastUse {
    pub time: Timestamp,
    pub service: String,
    pub region: String,
}

/// The account-wide reads of `rekey audit`: not part of [`Iam`], the operator never lists users.
impl AwsIam {
    /// ListUsers, every page (each page one call under the budget): (user names, pages read).
    pub async fn list_users(&self, path_prefix: Option<&str>) -> Result<(Vec<String>, u32), Error> {
        let (mut users, mut marker, mut pages) = (Vec::new(), None, 0);
        loop {
            let req = self.iam.list_users().set_path_prefix(path_prefix.map(str::to_owned)).set_marker(marker.take());
            let out = self.call("ListUsers", async { req.send().await.map_err(|e| iam_error("ListUsers", e)) }).await?;
            pages += 1;
            users.extend(out.users().iter().map(|u| u.user_name().to_owned()));
            match (out.is_truncated(), out.marker()) {
                (true, Some(m)) => marker = Some(m.to_owned()),
                // A partial account must never read as a complete one (an audit would pass on it).
                (true, None) => return Err(Error::Internal("ListUsers was truncated without a marker".into())),
                (false, _) => return Ok((users, pages)),
            }
        }
    }

    /// GetAccessKeyLastUsed with the service and region: None when never used.
    pub async fn last_use(&self, key_id: &str) -> Result<Option<LastUse>, Error> {
        self.call("GetAccessKeyLastUsed", async {
            let out = self
                .iam
                .get_access_key_last_used()
                .access_key_id(key_id)
                .send()
                .await
                .map_err(|e| iam_error("GetAccessKeyLastUsed", e))?;
            Ok(out.access_key_last_used().and_then(|u| {
                Some(LastUse {
                    time: ts(Some(u.last_used_date()?)),
                    service: u.service_name().to_owned(),
                    region: u.region().to_owned(),
                })
            }))
        })
        .await
    }
}

fn iam_error<E>(
    operation: &'static str,
    e: aws_sdk_iam::error::SdkError<E, aws_sdk_iam::config::http::HttpResponse>,
) -> Error
where
    E: aws_sdk_iam::error::ProvideErrorMetadata,
{
    let code = e.code().unwrap_or("Unknown").to_owned();
    let message = match &e {
        aws_sdk_iam::error::SdkError::ServiceError(_) => e.message().unwrap_or_default().to_owned(),
        aws_sdk_iam::error::SdkError::TimeoutError(_) => "timed out".to_owned(),
        aws_sdk_iam::error::SdkError::DispatchFailure(_) => {
            "not sent: no credentials could be obtained (e.g. a refused AssumeRole) or AWS is unreachable".to_owned()
        }
        _ => "request failed".to_owned(),
    };
    let code = if code == "Unknown" {
        match &e {
            aws_sdk_iam::error::SdkError::ServiceError(s) => format!("HTTP{}", s.raw().status().as_u16()),
            aws_sdk_iam::error::SdkError::DispatchFailure(_) => "NotSent".into(),
            aws_sdk_iam::error::SdkError::TimeoutError(_) => "Timeout".into(),
            _ => code,
        }
    } else {
        code
    };
    Error::Iam { operation, code, message }
}

fn ts(d: Option<&aws_smithy_types::DateTime>) -> Timestamp {
    d.and_then(|d| Timestamp::new(d.secs(), d.subsec_nanos() as i32).ok()).unwrap_or(Timestamp::UNIX_EPOCH)
}

impl Iam for AwsIam {
    async fn for_role(&self, role_arn: &str, external_id: &str, session: &str) -> Self {
        let provider = aws_config::sts::AssumeRoleProvider::builder(role_arn)
            .external_id(external_id)
            .session_name(session)
            .configure(&self.sdk)
            .build()
            .await;
        let sdk = self
            .sdk
            .to_builder()
            .credentials_provider(aws_credential_types::provider::SharedCredentialsProvider::new(provider))
            .build();
        let once = aws_sdk_iam::config::Builder::from(&sdk).retry_config(RetryConfig::disabled()).build();
        let account = crate::budget::account_of(role_arn);
        Self {
            iam: aws_sdk_iam::Client::new(&sdk),
            iam_once: aws_sdk_iam::Client::from_conf(once),
            sdk,
            account: self.budgets.account(account),
            sts: self.budgets.account(&format!("sts:{account}")),
            budgets: self.budgets.clone(),
            urgent: self.urgent,
            metrics: self.metrics.clone(),
        }
    }

    fn urgent(&self) -> Self {
        Self { urgent: true, ..self.clone() }
    }

    fn routine(&self) -> Self {
        Self { urgent: false, ..self.clone() }
    }

    fn urgent_waiting(&self) -> bool {
        self.budgets.urgent_waiting(&self.account)
    }

    async fn user_tags(&self, user: &str) -> Result<Option<BTreeMap<String, String>>, Error> {
        self.call("ListUserTags", async {
            let mut tags = BTreeMap::new();
            let mut marker = None;
            loop {
                let out = match self.iam.list_user_tags().user_name(user).set_marker(marker.clone()).send().await {
                    Ok(o) => o,
                    Err(e) if e.code() == Some("NoSuchEntity") => return Ok(None),
                    Err(e) => return Err(iam_error("ListUserTags", e)),
                };
                for t in out.tags() {
                    tags.insert(t.key().to_owned(), t.value().to_owned());
                }
                match (out.is_truncated(), out.marker()) {
                    (true, Some(m)) => marker = Some(m.to_owned()),
                    _ => return Ok(Some(tags)),
                }
            }
        })
        .await
    }

    async fn list_keys(&self, user: &str) -> Result<Vec<IamKey>, Error> {
        self.call("ListAccessKeys", async {
            let out =
                self.iam.list_access_keys().user_name(user).send().await.map_err(|e| iam_error("ListAccessKeys", e))?;
            Ok(out
                .access_key_metadata()
                .iter()
                .filter_map(|m| {
                    Some(IamKey {
                        id: m.access_key_id()?.to_owned(),
                        active: m.status() == Some(&StatusType::Active),
                        created: ts(m.create_date()),
                    })
                })
                .collect())
        })
        .await
    }

    async fn create_key(&self, user: &str) -> Result<(AccessKey, Timestamp), Error> {
        self.call("CreateAccessKey", async {
            let out = self
                .iam_once
                .create_access_key()
                .user_name(user)
                .send()
                .await
                .map_err(|e| iam_error("CreateAccessKey", e))?;
            let k = out.access_key().ok_or_else(|| Error::Internal("CreateAccessKey returned no key".into()))?;
            let key = AccessKey {
                id: k.access_key_id().to_owned(),
                secret: SecretString::from(k.secret_access_key().to_owned()),
            };
            Ok((key, ts(k.create_date())))
        })
        .await
    }

    async fn set_key_active(&self, user: &str, key_id: &str, active: bool) -> Result<(), Error> {
        self.call("UpdateAccessKey", async {
            let status = if active { StatusType::Active } else { StatusType::Inactive };
            self.iam
                .update_access_key()
                .user_name(user)
                .access_key_id(key_id)
                .status(status)
                .send()
                .await
                .map_err(|e| iam_error("UpdateAccessKey", e))?;
            Ok(())
        })
        .await
    }

    async fn delete_key(&self, user: &str, key_id: &str) -> Result<(), Error> {
        self.call("DeleteAccessKey", async {
            match self.iam.delete_access_key().user_name(user).access_key_id(key_id).send().await {
                Ok(_) => Ok(()),
                // Already gone (a retried delete whose first answer was lost): the goal is reached.
                Err(e) if e.code() == Some("NoSuchEntity") => Ok(()),
                Err(e) => Err(iam_error("DeleteAccessKey", e)),
            }
        })
        .await
    }

    async fn tag_user(&self, user: &str, key: &str, value: &str) -> Result<(), Error> {
        self.call("TagUser", async {
            let tag = aws_sdk_iam::types::Tag::builder()
                .key(key)
                .value(value)
                .build()
                .map_err(|_| Error::Internal("tag".into()))?;
            self.iam.tag_user().user_name(user).tags(tag).send().await.map_err(|e| iam_error("TagUser", e))?;
            Ok(())
        })
        .await
    }

    async fn untag_user(&self, user: &str, key: &str) -> Result<(), Error> {
        self.call("UntagUser", async {
            match self.iam.untag_user().user_name(user).tag_keys(key).send().await {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("NoSuchEntity") => Ok(()),
                Err(e) => Err(iam_error("UntagUser", e)),
            }
        })
        .await
    }

    async fn last_used(&self, key_id: &str) -> Result<Option<Timestamp>, Error> {
        Ok(self.last_use(key_id).await?.map(|u| u.time))
    }

    async fn verify(&self, key: &AccessKey, region: &str) -> Result<Verification, Error> {
        self.call_within(&self.sts, "GetCallerIdentity", async {
            let creds =
                Credentials::new(key.id.clone(), key.secret.expose_secret().to_owned(), None, None, "rekey-new-key");
            let conf = aws_sdk_sts::config::Builder::from(&self.sdk)
                .credentials_provider(creds)
                .region(aws_config::Region::new(region.to_owned()))
                .build();
            match aws_sdk_sts::Client::from_conf(conf).get_caller_identity().send().await {
                Ok(out) => Ok(Verification::Authenticated(out.arn().unwrap_or_default().to_owned())),
                Err(e) => match e.as_service_error() {
                    // Rejections of the key itself; throttling and 5xx are errors to retry.
                    Some(se)
                        if matches!(
                            se.code(),
                            Some("InvalidClientTokenId" | "SignatureDoesNotMatch" | "AccessDenied" | "ExpiredToken")
                        ) =>
                    {
                        Ok(Verification::Rejected(se.code().unwrap_or_default().to_owned()))
                    }
                    _ => {
                        let code = e.code().unwrap_or("Unknown").to_owned();
                        Err(Error::Iam {
                            operation: "GetCallerIdentity",
                            code,
                            message: "verification call failed".into(),
                        })
                    }
                },
            }
        })
        .await
    }

    async fn whoami(&self) -> Result<String, Error> {
        self.call("GetCallerIdentity", async {
            let out =
                aws_sdk_sts::Client::new(&self.sdk).get_caller_identity().send().await.map_err(|e| Error::Iam {
                    operation: "GetCallerIdentity",
                    code: e.code().unwrap_or("Unknown").to_owned(),
                    message: String::new(),
                })?;
            Ok(out.arn().unwrap_or_default().to_owned())
        })
        .await
    }
}

/// The IAM user name in a user ARN (`arn:aws:iam::123:user/path/name` -> `name`).
pub fn user_of_arn(arn: &str) -> Option<&str> {
    let (_, rest) = arn.split_once(":user/")?;
    rest.rsplit('/').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_come_from_user_arns_only() {
        assert_eq!(user_of_arn("arn:aws:iam::123456789012:user/billing-app"), Some("billing-app"));
        assert_eq!(user_of_arn("arn:aws:iam::123456789012:user/team/a/billing-app"), Some("billing-app"));
        assert_eq!(user_of_arn("arn:aws:sts::123456789012:assumed-role/r/s"), None);
    }
}
