//! Events, published off the reconcile's path. TOUCHES THE CLUSTER (from a task of its own).
//!
//! A step never waits for an Event: a slow or failing apiserver answer to an Event write once held
//! rotations up for minutes when a thousand of them warned at once. `publish` queues the Event and
//! returns; one task writes the queue out in order. A full queue drops the Event (logged and
//! counted): the status, not the Event stream, is the record of what happened.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource as _;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::api::IamKeyRotation;

/// How many Events may wait to be written.
const QUEUE: usize = 4096;

/// Where rekey's Events go. Warnings repeat (a failing step is retried with backoff), so they go
/// through one shared kube Recorder, which folds repeats into a series. Normal Events mark
/// transitions, which do not repeat, so each gets a Recorder of its own: the shared one keeps every
/// Event it published for 6 minutes, which for 10,000 resources looked at once was 13 MiB.
pub struct Events {
    queue: mpsc::Sender<(ObjectReference, Event)>,
    dropped: std::sync::atomic::AtomicU64,
}

impl Events {
    /// Starts the writer task: call it inside the Tokio runtime.
    pub fn new(client: kube::Client, reporter: Reporter) -> Self {
        let (queue, mut rx) = mpsc::channel::<(ObjectReference, Event)>(QUEUE);
        tokio::spawn(async move {
            let warnings = Recorder::new(client.clone(), reporter.clone());
            while let Some((obj, ev)) = rx.recv().await {
                let published = match ev.type_ {
                    EventType::Warning => warnings.publish(&ev, &obj).await,
                    EventType::Normal => Recorder::new(client.clone(), reporter.clone()).publish(&ev, &obj).await,
                };
                if let Err(e) = published {
                    tracing::warn!(error = %crate::error::transport_kind(&e), reason = %ev.reason, "could not publish an Event");
                }
            }
        });
        Self { queue, dropped: Default::default() }
    }

    /// Queues an Event and returns at once.
    pub fn publish(&self, obj: &IamKeyRotation, warning: bool, reason: &str, note: String, action: &str) {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if self.queue.try_send((obj.object_ref(&()), ev)).is_err() {
            let n = self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            tracing::warn!(reason, dropped = n, "Event queue full: Event dropped");
        }
    }
}
