//! How many AWS calls per second rekey makes, per AWS account, and in what order.
//!
//! IAM throttles per account, so each account a resource reaches (the home account, or the one of
//! its spec.aws.roleArn) has a budget of its own: one noisy account does not slow the others. An
//! optional ceiling bounds all accounts together. Calls of an emergency rotation (a leaked key)
//! go first: while one waits, routine calls wait behind it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Limiter = governor::DefaultDirectRateLimiter;

/// No burst: the cap holds in every one-second window, not just on average (a full bucket plus a
/// second's refill once let 169 calls through in one second at a cap of 100).
fn limiter(per_second: NonZeroU32) -> Limiter {
    Limiter::direct(governor::Quota::per_second(per_second).allow_burst(NonZeroU32::MIN))
}

/// One account's budget.
pub struct Budget {
    limiter: Limiter,
    /// Urgent calls waiting for this budget: routine ones let them through first.
    urgent: AtomicUsize,
}

impl Budget {
    fn new(per_second: NonZeroU32) -> Self {
        Self { limiter: limiter(per_second), urgent: AtomicUsize::new(0) }
    }

    /// Waits for a permit. Every waiter sleeps until the limiter's next permit and tries again;
    /// a routine one also stands back while an urgent one is waiting.
    async fn acquire(&self, urgent: bool) {
        if urgent {
            self.urgent.fetch_add(1, Ordering::AcqRel);
        }
        loop {
            let waits = !urgent && self.urgent.load(Ordering::Acquire) > 0;
            let next = if waits { Err(Duration::from_millis(5)) } else { self.try_take() };
            match next {
                Ok(()) => break,
                Err(wait) => tokio::time::sleep(wait.max(Duration::from_millis(1))).await,
            }
        }
        if urgent {
            self.urgent.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether an urgent call (a leaked key's) waits for this budget now.
    pub fn urgent_waiting(&self) -> bool {
        self.urgent.load(Ordering::Acquire) > 0
    }

    fn try_take(&self) -> Result<(), Duration> {
        use governor::clock::Clock as _;
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(governor::clock::DefaultClock::default().now()))
    }
}

/// Every account's budget, and the ceiling over all of them.
pub struct Budgets {
    per_account: NonZeroU32,
    accounts: Mutex<HashMap<String, Arc<Budget>>>,
    ceiling: Option<Budget>,
}

impl Budgets {
    pub fn new(per_account: NonZeroU32, ceiling: Option<NonZeroU32>) -> Self {
        Self { per_account, accounts: Mutex::default(), ceiling: ceiling.map(Budget::new) }
    }

    /// The budget of `account` ("" for the home account), made on first use.
    pub fn account(&self, account: &str) -> Arc<Budget> {
        let Ok(mut all) = self.accounts.lock() else { return Arc::new(Budget::new(self.per_account)) };
        all.entry(account.to_owned()).or_insert_with(|| Arc::new(Budget::new(self.per_account))).clone()
    }

    /// Whether urgent calls wait for `account` (or for the ceiling over every account).
    pub fn urgent_waiting(&self, account: &Budget) -> bool {
        account.urgent_waiting() || self.ceiling.as_ref().is_some_and(Budget::urgent_waiting)
    }

    /// Waits until a call to `account` may be made.
    pub async fn acquire(&self, account: &Budget, urgent: bool) {
        account.acquire(urgent).await;
        if let Some(c) = &self.ceiling {
            c.acquire(urgent).await;
        }
    }
}

/// The account id in a role ARN (`arn:aws:iam::123456789012:role/x` → `123456789012`).
pub fn account_of(role_arn: &str) -> &str {
    role_arn.split(':').nth(4).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).unwrap()
    }

    #[test]
    fn accounts_have_budgets_of_their_own() {
        let b = Budgets::new(n(1), None);
        assert!(Arc::ptr_eq(&b.account("111122223333"), &b.account("111122223333")));
        assert!(!Arc::ptr_eq(&b.account("111122223333"), &b.account("444455556666")));
        assert_eq!(account_of("arn:aws:iam::111122223333:role/rekey/x"), "111122223333");
    }

    #[tokio::test]
    async fn an_urgent_call_goes_before_the_routine_ones_already_waiting() {
        let b = Arc::new(Budgets::new(n(20), None));
        let acct = b.account("");
        b.acquire(&acct, false).await; // this 50 ms's permit is used
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, urgent) in [(0, false), (1, false), (2, false), (3, true)] {
            let (b, acct, order) = (b.clone(), acct.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                // The routine calls start waiting first.
                if urgent {
                    tokio::task::yield_now().await;
                }
                b.acquire(&acct, urgent).await;
                order.lock().unwrap().push(i);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(order.lock().unwrap()[0], 3, "{:?}", order.lock().unwrap());
    }
}
