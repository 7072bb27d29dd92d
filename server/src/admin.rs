//! Operator controls (`modelcache.v1.Admin`, used by `cache-agent admin …`): forget the
//! revision a node trusts for a model, list the model in the origin now, pin or unpin a
//! model, or list the pins, on this node and, when asked, on every other member the node
//! knows, the model's owner first (the others list it through the owner). Each node
//! answers for itself, so a member that is down shows in the answer instead of failing
//! the call.

use std::sync::Arc;
use std::time::Duration;

use modelcache_proto::Reference;
use modelcache_proto::auth::{Action as Scope, WithToken};
use modelcache_proto::v1::admin_client::AdminClient;
use modelcache_proto::v1::admin_server::Admin;
use modelcache_proto::v1::{AdminRequest, AdminResponse, NodeOutcome, PinView};
use tonic::{Request, Response, Status};

use crate::access::code_name;
use crate::cluster::{Cluster, MemberView};
use crate::error::{Error, Result};
use crate::registry::Registry;

/// How long a member may take to answer a forwarded call; a pin writes a whole model.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
const FORWARD_PIN_TIMEOUT: Duration = Duration::from_secs(3600);

pub struct AdminService {
    registry: Arc<Registry>,
    cluster: Arc<Cluster>,
}

#[derive(Clone, Copy)]
enum Action {
    Invalidate,
    Revalidate,
    Pin,
    Unpin,
    ListPins,
}

impl AdminService {
    pub fn new(registry: Arc<Registry>, cluster: Arc<Cluster>) -> Self {
        Self { registry, cluster }
    }

    /// `token`: the caller's own `authorization`, presented to the other members in turn.
    async fn act(
        &self,
        request: AdminRequest,
        action: Action,
        token: Option<http::HeaderValue>,
    ) -> Result<AdminResponse, Status> {
        let reference = match action {
            Action::ListPins => None,
            _ => Some(Reference::parse(&request.reference).map_err(Error::from)?),
        };
        let members: Vec<MemberView> = self
            .cluster
            .members()
            .into_iter()
            .filter(|m| request.cluster || m.local)
            .collect();
        // The model's owner first: the other members list it through the owner, so they
        // see what it found.
        let order: Vec<String> = match &reference {
            Some(r) => {
                modelcache_proto::rank::rank(r.name(), members.iter().map(|m| m.id.as_str()))
                    .into_iter()
                    .map(str::to_owned)
                    .collect()
            }
            None => members.iter().map(|m| m.id.clone()).collect(),
        };
        let mut nodes = Vec::new();
        for id in order {
            let Some(member) = members.iter().find(|m| m.id == id) else {
                continue;
            };
            nodes.push(if member.local {
                self.here(reference.as_ref(), action).await
            } else {
                let request = AdminRequest {
                    reference: request.reference.clone(),
                    cluster: false,
                };
                forward(&self.cluster, member, request, action, token.clone()).await
            });
        }
        Ok(AdminResponse { nodes })
    }

    /// The call on this node.
    async fn here(&self, reference: Option<&Reference>, action: Action) -> NodeOutcome {
        let mut outcome = NodeOutcome {
            node_id: self.cluster.id().to_owned(),
            address: self.cluster.advertise(),
            ..Default::default()
        };
        if let Err(e) = self.run(reference, action, &mut outcome).await {
            outcome.error = Status::from(e).message().to_owned();
        }
        let model = reference.map(|r| r.to_string()).unwrap_or_default();
        let action = action_name(action);
        tracing::info!(model, action, error = %outcome.error, "operator control");
        outcome
    }

    async fn run(
        &self,
        reference: Option<&Reference>,
        action: Action,
        outcome: &mut NodeOutcome,
    ) -> Result<()> {
        let catalog = self.registry.catalog();
        let pins = self.registry.pins();
        let Some(r) = reference else {
            outcome.pins = pins
                .list()
                .into_iter()
                .map(|p| PinView {
                    reference: p.reference(),
                    revision: p.revision,
                    bytes: p.bytes,
                })
                .collect();
            return Ok(());
        };
        match action {
            Action::Invalidate => catalog.invalidate(r.name()),
            Action::Revalidate => {
                outcome.revision = catalog.revalidate(r.name()).await?.revision.id.clone();
                // Pins of the model move to what the origin holds now.
                for pin in pins.list().iter().filter(|p| p.name == r.name()) {
                    let pinned = Reference::new(&pin.name, &pin.variant)?;
                    crate::pinning::pin(&self.registry, &pinned).await?;
                }
            }
            Action::Pin => {
                let pin = crate::pinning::pin(&self.registry, r).await?;
                (outcome.revision, outcome.bytes) = (pin.revision, pin.bytes);
            }
            Action::Unpin => {
                let pin = pins.unpin(r).await?;
                (outcome.revision, outcome.bytes) = (pin.revision, pin.bytes);
            }
            // Parsed no reference: answered above.
            Action::ListPins => {}
        }
        Ok(())
    }
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Invalidate => "invalidate",
        Action::Revalidate => "revalidate",
        Action::Pin => "pin",
        Action::Unpin => "unpin",
        Action::ListPins => "pins",
    }
}

/// The call on one other member (for itself only); its failure is its outcome.
async fn forward(
    cluster: &Cluster,
    member: &MemberView,
    request: AdminRequest,
    action: Action,
    token: Option<http::HeaderValue>,
) -> NodeOutcome {
    let address = member.address.clone();
    let call = async {
        let channel = cluster.dial(&address).await?;
        let mut client = AdminClient::new(WithToken {
            inner: channel,
            token,
        });
        let response = match action {
            Action::Invalidate => client.invalidate(request).await,
            Action::Revalidate => client.revalidate(request).await,
            Action::Pin => client.pin(request).await,
            Action::Unpin => client.unpin(request).await,
            Action::ListPins => client.pins(request).await,
        };
        let status_text = |s: Status| format!("{}: {}", code_name(s.code()), s.message());
        Ok::<_, String>(response.map_err(status_text)?.into_inner().nodes)
    };
    let failed = |error: String| NodeOutcome {
        node_id: member.id.clone(),
        address: member.address.clone(),
        error,
        ..Default::default()
    };
    let timeout = match action {
        Action::Pin | Action::Revalidate => FORWARD_PIN_TIMEOUT,
        _ => FORWARD_TIMEOUT,
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(mut nodes)) if !nodes.is_empty() => nodes.swap_remove(0),
        Ok(Ok(_)) => failed("the member answered for no node".into()),
        Ok(Err(e)) => failed(e),
        Err(_) => failed(format!("no answer within {} s", timeout.as_secs())),
    }
}

impl AdminService {
    async fn call(
        &self,
        request: Request<AdminRequest>,
        action: Action,
    ) -> Result<Response<AdminResponse>, Status> {
        crate::access::RpcNote::reference(request.extensions(), &request.get_ref().reference);
        let name = match action {
            Action::ListPins => None,
            _ => Reference::parse(&request.get_ref().reference).ok(),
        };
        let name = name.as_ref().map(Reference::name);
        modelcache_proto::auth::authorize(request.extensions(), Scope::Admin, name)?;
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| http::HeaderValue::from_bytes(v.as_bytes()).ok())
            .map(|mut header| {
                header.set_sensitive(true);
                header
            });
        self.act(request.into_inner(), action, token)
            .await
            .map(Response::new)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn invalidate(
        &self,
        request: Request<AdminRequest>,
    ) -> Result<Response<AdminResponse>, Status> {
        self.call(request, Action::Invalidate).await
    }

    async fn revalidate(
        &self,
        request: Request<AdminRequest>,
    ) -> Result<Response<AdminResponse>, Status> {
        self.call(request, Action::Revalidate).await
    }

    async fn pin(&self, request: Request<AdminRequest>) -> Result<Response<AdminResponse>, Status> {
        self.call(request, Action::Pin).await
    }

    async fn unpin(
        &self,
        request: Request<AdminRequest>,
    ) -> Result<Response<AdminResponse>, Status> {
        self.call(request, Action::Unpin).await
    }

    async fn pins(
        &self,
        request: Request<AdminRequest>,
    ) -> Result<Response<AdminResponse>, Status> {
        self.call(request, Action::ListPins).await
    }
}
