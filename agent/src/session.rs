//! The relay task: drives the session's state machine (`vmesh_relay::Session`) with what
//! happens — local discovery changes, messages and ends of streams, timers — and carries out
//! the actions it returns with the calls of `client.rs`, feeding each outcome back. It decides
//! nothing itself; it logs the session's notes.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Status;
use tracing::{error, info, warn};
use vmesh_proto::v1::{ControllerMessage, ServiceInstance};
use vmesh_relay::session::StreamId;
use vmesh_relay::{Action, Ended, Note, Session};
use vmesh_runtime::Shutdown;

use crate::client::{credential, ended, NodeInfo, Relay, Stream};
use crate::datadir::Credentials;

/// How long the first stream waits for the first read of the local Consul agent.
const FIRST_READ: Duration = Duration::from_secs(2);

/// What woke the task.
enum Event {
    Local,
    Message(StreamId, Result<Option<ControllerMessage>, Status>),
    Tick,
}

async fn recv(stream: Option<&mut Stream>) -> Result<Option<ControllerMessage>, Status> {
    match stream {
        Some(s) => s.rx.message().await,
        None => std::future::pending().await,
    }
}

fn round_ms(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
}

/// The relay session, until a shutdown is asked for. An error means retrying cannot help (the
/// controller refused to register the agent again).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    relay: Relay,
    node: NodeInfo,
    bind: Option<IpAddr>,
    mut creds: Credentials,
    last_discovery: Option<Vec<ServiceInstance>>,
    mut local: watch::Receiver<Option<Vec<ServiceInstance>>>,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut session = Session::new(
        crate::VERSION,
        credential(&creds),
        relay.token.is_some(),
        last_discovery,
        std::time::Instant::now(),
        SystemTime::now(),
        vmesh_retry::seed(),
    );
    let mut streams: BTreeMap<StreamId, Stream> = BTreeMap::new();
    // The first snapshot carries what the local Consul agent says now, not what the data dir
    // kept, unless it does not answer soon (then the kept discovery is reported, and the first
    // read follows as a delta).
    tokio::select! {
        () = shutdown.requested() => return Ok(()),
        _ = tokio::time::timeout(FIRST_READ, local.wait_for(Option::is_some)) => {}
    }
    if let Some(instances) = local.borrow_and_update().clone() {
        session.on_local(instances);
    }
    let mut queue: VecDeque<Action> = session
        .on_tick(std::time::Instant::now(), SystemTime::now())
        .into();
    loop {
        while let Some(action) = queue.pop_front() {
            vmesh_runtime::test_panic("relay");
            let now = std::time::Instant::now();
            let more = match action {
                Action::Open { id, messages } => {
                    let opened = tokio::select! {
                        opened = relay.open_stream(&creds, bind, messages) => opened,
                        () = shutdown.requested() => return Ok(()),
                    };
                    match opened {
                        Ok(stream) => {
                            streams.insert(id, stream);
                            session.on_opened(id, Ok(()), std::time::Instant::now())
                        }
                        Err(e) => session.on_opened(id, Err(e.ended()), std::time::Instant::now()),
                    }
                }
                Action::Send { id, messages } => {
                    if streams.get(&id).is_some_and(|s| s.send(messages)) {
                        Vec::new()
                    } else {
                        // Stuck or gone: replace it; the next stream starts with a snapshot.
                        streams.remove(&id);
                        session.on_ended(id, Ended::failed("the stream is gone or stuck"), now)
                    }
                }
                Action::Close { id } => {
                    streams.remove(&id);
                    Vec::new()
                }
                Action::Renew => {
                    let channel = session
                        .current()
                        .and_then(|id| streams.get(&id))
                        .map(|s| s.channel.clone());
                    let renewed = tokio::select! {
                        renewed = relay.renew(channel, &creds, &node, bind) => renewed,
                        () = shutdown.requested() => return Ok(()),
                    };
                    let outcome = match renewed {
                        Ok(new) => {
                            creds = new;
                            Ok(credential(&creds))
                        }
                        Err(e) => Err(format!("{e:#}")),
                    };
                    session.on_renewed(outcome, std::time::Instant::now(), SystemTime::now())
                }
                Action::Register => {
                    creds = tokio::select! {
                        registered = relay.register(&node, None, bind) => registered?,
                        () = shutdown.requested() => return Ok(()),
                    };
                    session.on_registered(
                        credential(&creds),
                        std::time::Instant::now(),
                        SystemTime::now(),
                    )
                }
            };
            queue.extend(more);
            log_notes(&mut session, &relay, &node, &creds);
        }
        log_notes(&mut session, &relay, &node, &creds);

        let (current, pending) = (session.current(), session.pending());
        let (mut current_stream, mut pending_stream) = (None, None);
        for (id, stream) in streams.iter_mut() {
            if Some(*id) == current {
                current_stream = Some(stream);
            } else if Some(*id) == pending {
                pending_stream = Some(stream);
            }
        }
        let deadline = Instant::from_std(session.next_deadline());
        let event = tokio::select! {
            biased;
            () = shutdown.requested() => return Ok(()),
            changed = local.changed() => {
                // The discovery task ended: a shutdown, or the process ends for it anyway.
                if changed.is_err() {
                    return Ok(());
                }
                Event::Local
            }
            m = recv(current_stream) => Event::Message(current.unwrap_or_default(), m),
            m = recv(pending_stream) => Event::Message(pending.unwrap_or_default(), m),
            () = tokio::time::sleep_until(deadline) => Event::Tick,
        };
        let now = std::time::Instant::now();
        let actions = match event {
            Event::Local => match local.borrow_and_update().clone() {
                Some(instances) => session.on_local(instances),
                None => Vec::new(),
            },
            Event::Message(id, Ok(Some(message))) => session.on_message(id, &message),
            Event::Message(id, Ok(None)) => {
                streams.remove(&id);
                session.on_ended(id, Ended::closed(), now)
            }
            Event::Message(id, Err(status)) => {
                streams.remove(&id);
                session.on_ended(id, ended(&status), now)
            }
            Event::Tick => session.on_tick(now, SystemTime::now()),
        };
        queue.extend(actions);
    }
}

fn log_notes(session: &mut Session, relay: &Relay, node: &NodeInfo, creds: &Credentials) {
    let id = &creds.identity.spiffe_id;
    let not_after = humantime::format_rfc3339_seconds(creds.not_after());
    for note in session.take_notes() {
        match note {
            Note::Connected => {
                info!(spiffe_id = %id, relay = %relay.args.relay_addr, "connected to the controller")
            }
            Note::ConnectFailed { reason, retry_in } => warn!(
                relay = %relay.args.relay_addr,
                "cannot connect to the controller ({reason}); retrying in {}",
                round_ms(retry_in)
            ),
            Note::Disconnected { reason, retry_in } => info!(
                reason = %reason,
                "disconnected from the controller; reconnecting in {}",
                round_ms(retry_in)
            ),
            Note::Revoked { reason, retry_in } => error!(
                spiffe_id = %id,
                "the controller refused this agent: it was revoked ({reason}). Re-admit it with \
                 `vmeshctl agent allow {} --datacenter {}` (if its certificate expires meanwhile, \
                 restart it with a new bootstrap token from `vmeshctl token create`); retrying \
                 every {}",
                node.node,
                node.datacenter,
                round_ms(retry_in)
            ),
            Note::ResyncRequested { reason } => {
                info!(reason = %reason, "resync requested by the controller")
            }
            Note::Renewed => {
                info!(spiffe_id = %id, not_after = %not_after, "renewed the certificate")
            }
            Note::RenewFailed { reason, retry_in } => warn!(
                not_after = %not_after,
                "cannot renew the certificate ({reason}); retrying in {}",
                round_ms(retry_in)
            ),
            Note::SwitchOpened => {
                info!(spiffe_id = %id, "opened a stream with the renewed certificate")
            }
            Note::Switched => info!(
                spiffe_id = %id,
                "the stream with the renewed certificate is acknowledged; closed the old one"
            ),
            Note::SwitchFailed { reason } => warn!(
                reason = %reason,
                "the stream with the renewed certificate failed before it was acknowledged; retrying"
            ),
            Note::OldStreamEnded { reason } => info!(
                reason = %reason,
                "the old stream ended during renewal; continuing on the new one"
            ),
            Note::ExpiredWithoutToken => error!(
                spiffe_id = %id,
                not_after = %not_after,
                "the agent's certificate expired before it could be renewed and no bootstrap \
                 token is configured: restart the agent with a new token (--token-file); \
                 retrying"
            ),
            Note::Reregistering => warn!(
                not_after = %not_after,
                "the agent's certificate expired; registering again with the bootstrap token"
            ),
        }
    }
}
