//! The gRPC layer: decode the request, call the registry, map the result. Nothing else.

use std::sync::Arc;

use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use modelcache_proto::v1::model_cache_server::ModelCache;
use modelcache_proto::v1::{
    self, FetchRequest, FetchResponse, ListRequest, ListResponse, PrefetchRequest,
    PrefetchResponse, PrefetchResult, ResolveRequest, ResolveResponse, fetch_response,
};
use modelcache_proto::{CHUNK_SIZE, Reference};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::registry::{Registry, chunk_plan};

pub struct NodeService {
    registry: Arc<Registry>,
}

impl NodeService {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

fn parse(reference: &str) -> Result<Reference, Status> {
    Reference::parse(reference).map_err(|e| Error::from(e).into())
}

#[tonic::async_trait]
impl ModelCache for NodeService {
    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let reference = parse(&request.get_ref().reference)?;
        let resolved = self.registry.resolve(&reference).await?;
        Ok(Response::new(ResolveResponse {
            manifest: Some(self.registry.manifest(&resolved)),
        }))
    }

    type FetchStream = BoxStream<'static, Result<FetchResponse, Status>>;

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let req = request.into_inner();
        let reference = parse(&req.reference)?;
        let resolved = self.registry.resolve(&reference).await?;
        let rev = resolved.revision.clone();
        if !req.revision.is_empty() && req.revision != rev.id {
            return Err(Error::RevisionChanged {
                name: rev.name.clone(),
                requested: req.revision,
                current: rev.id.clone(),
            }
            .into());
        }
        let start_file = if req.file.is_empty() {
            0
        } else {
            rev.file_index(&req.file)
                .ok_or_else(|| Error::FileNotFound {
                    name: rev.name.clone(),
                    path: req.file.clone(),
                })?
        };
        if let Some(record) = rev.files.get(start_file)
            && req.offset > record.origin.size
        {
            return Err(Error::OffsetOutOfRange {
                name: rev.name.clone(),
                path: record.origin.path.clone(),
                offset: req.offset,
                size: record.origin.size,
            }
            .into());
        }
        let plan = chunk_plan(&rev, start_file, req.offset / CHUNK_SIZE);
        let manifest = FetchResponse {
            item: Some(fetch_response::Item::Manifest(
                self.registry.manifest(&resolved),
            )),
        };
        let registry = self.registry.clone();
        let parallelism = registry.origin_parallelism();
        let chunks = stream::iter(plan)
            .map({
                let registry = registry.clone();
                let rev = rev.clone();
                move |(f, i)| {
                    let registry = registry.clone();
                    let rev = rev.clone();
                    async move {
                        let (value, _tier) = registry.chunk(&rev, f, i).await?;
                        registry.stats.bytes_served.fetch_add(
                            value.data.len() as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        Ok::<_, Error>(FetchResponse {
                            item: Some(fetch_response::Item::Chunk(v1::Chunk {
                                file_index: f as u32,
                                offset: i * CHUNK_SIZE,
                                data: value.data,
                                blake3: value.digest.to_vec(),
                            })),
                        })
                    }
                }
            })
            .buffered(parallelism)
            .map_err(Status::from);
        let body = stream::once(std::future::ready(Ok(manifest))).chain(chunks);
        Ok(Response::new(body.boxed()))
    }

    async fn prefetch(
        &self,
        request: Request<PrefetchRequest>,
    ) -> Result<Response<PrefetchResponse>, Status> {
        let references = request
            .into_inner()
            .references
            .iter()
            .map(|r| parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        let mut results = Vec::with_capacity(references.len());
        for reference in references {
            let mut result = PrefetchResult {
                reference: reference.to_string(),
                ..Default::default()
            };
            match self.warm(&reference).await {
                Ok((revision, total_size, origin_bytes)) => {
                    result.revision = revision;
                    result.total_size = total_size;
                    result.origin_bytes = origin_bytes;
                }
                Err(e) => result.error = e.to_string(),
            }
            results.push(result);
        }
        Ok(Response::new(PrefetchResponse { results }))
    }

    async fn list(&self, _request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let models = self.registry.list().await?;
        Ok(Response::new(ListResponse { models }))
    }
}

impl NodeService {
    async fn warm(&self, reference: &Reference) -> Result<(String, u64, u64), Error> {
        let resolved = self.registry.resolve(reference).await?;
        let rev = resolved.revision;
        let origin_bytes = self.registry.warm(&rev).await?;
        Ok((rev.id.clone(), rev.total_size, origin_bytes))
    }
}
