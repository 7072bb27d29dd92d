//! Who may call: bearer tokens from a tokens file (`--auth-tokens-file`), one grant per
//! line, `[name:]token[:actions[:prefixes]]`:
//!
//! ```text
//! # name:token                      every action, every model
//! ops:0f3c…e1
//! # name:token:actions:prefixes     only fetching models under org-a/
//! team-a:9b1d…77:fetch:org-a/
//! ```
//!
//! Actions are `fetch`, `prefetch` and `admin` (comma-separated; empty or `*` is all),
//! prefixes are model-name prefixes (comma-separated; empty is every model). A token is
//! compared by its BLAKE3 hash, in constant time, with every grant. The file is read again
//! when it changes: a token removed from it is refused from then on; a file that no longer
//! parses is reported and the grants read before stay in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tonic::codegen::http;

/// What a grant allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Fetch,
    Prefetch,
    Admin,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Fetch => "fetch",
            Action::Prefetch => "prefetch",
            Action::Admin => "admin",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        match word {
            "fetch" => Some(Action::Fetch),
            "prefetch" => Some(Action::Prefetch),
            "admin" => Some(Action::Admin),
            _ => None,
        }
    }
}

/// One line of the tokens file.
#[derive(Clone, Debug)]
struct Grant {
    hash: blake3::Hash,
    caller: Caller,
}

/// Who called, as the grant that let them in says: put into each request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    /// `None`: every action.
    actions: Option<Vec<Action>>,
    /// Empty: every model.
    prefixes: Vec<String>,
}

impl Caller {
    /// Whether this caller may do `action` on model `name` (`None`: no model involved):
    /// `PERMISSION_DENIED` naming the grant's scope when it may not.
    pub fn allows(&self, action: Action, name: Option<&str>) -> Result<(), tonic::Status> {
        if let Some(actions) = &self.actions
            && !actions.contains(&action)
        {
            let granted: Vec<&str> = actions.iter().map(|a| a.name()).collect();
            return Err(tonic::Status::permission_denied(format!(
                "token {:?} may not {} (it is granted: {})",
                self.name,
                action.name(),
                granted.join(", ")
            )));
        }
        match name {
            Some(name) if !self.sees(name) => Err(tonic::Status::permission_denied(format!(
                "token {:?} may not reach model {name:?} (it is granted models under: {})",
                self.name,
                self.prefixes.join(", ")
            ))),
            _ => Ok(()),
        }
    }

    /// Whether model `name` is within this caller's prefixes.
    pub fn sees(&self, name: &str) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// Parses a tokens file; an error names the line and what is wrong with it.
fn parse(text: &str) -> Result<Vec<Grant>, String> {
    let mut grants = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let n = i + 1;
        let parts: Vec<&str> = line.split(':').collect();
        let (name, token, actions, prefixes) = match parts.as_slice() {
            [token] => (format!("line {n}"), *token, "", ""),
            [name, token] => ((*name).to_owned(), *token, "", ""),
            [name, token, actions] => ((*name).to_owned(), *token, *actions, ""),
            [name, token, actions, prefixes] => ((*name).to_owned(), *token, *actions, *prefixes),
            _ => return Err(format!("line {n}: more than four `:`-separated fields")),
        };
        if token.len() < 16 {
            return Err(format!(
                "line {n}: the token of {name:?} is shorter than 16 characters"
            ));
        }
        if name.is_empty() {
            return Err(format!("line {n}: an empty name before the token"));
        }
        let actions = match actions {
            "" | "*" => None,
            list => Some(
                list.split(',')
                    .map(|w| {
                        Action::parse(w.trim()).ok_or_else(|| {
                            format!(
                                "line {n}: unknown action {w:?} (known: fetch, prefetch, admin)"
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let prefixes = prefixes
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if grants.iter().any(|g: &Grant| g.caller.name == name) {
            return Err(format!("line {n}: the name {name:?} is given twice"));
        }
        grants.push(Grant {
            hash: blake3::hash(token.as_bytes()),
            caller: Caller {
                name,
                actions,
                prefixes,
            },
        });
    }
    Ok(grants)
}

/// The grants of one tokens file, read again when it changes.
pub struct Tokens {
    path: PathBuf,
    grants: RwLock<Arc<Vec<Grant>>>,
    /// The file's modification time and length when last read.
    stamp: RwLock<Option<(SystemTime, u64)>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("path", &self.path).finish()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read(path: &Path) -> Result<Vec<Grant>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the tokens file {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("tokens file {}: {e}", path.display()))
}

impl Tokens {
    /// Reads `path`; an unreadable or malformed file is an error.
    pub fn load(path: &Path) -> Result<Arc<Self>, String> {
        let before = stamp(path);
        let grants = read(path)?;
        if grants.is_empty() {
            return Err(format!(
                "tokens file {} grants nothing: every call would be refused",
                path.display()
            ));
        }
        Ok(Arc::new(Self {
            path: path.to_owned(),
            grants: RwLock::new(Arc::new(grants)),
            stamp: RwLock::new(before),
        }))
    }

    /// The caller a request's `authorization: Bearer TOKEN` header names:
    /// `UNAUTHENTICATED` saying what is wrong when no grant holds it.
    pub fn authenticate(
        &self,
        header: Option<&http::HeaderValue>,
    ) -> Result<Caller, tonic::Status> {
        let Some(token) = header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return Err(tonic::Status::unauthenticated(
                "no bearer token: this service requires one in an `authorization: Bearer \
                 TOKEN` header (cache-agent: --token-file, or CACHE_AGENT_TOKEN)",
            ));
        };
        let presented = blake3::hash(token.trim().as_bytes());
        let grants = self
            .grants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Every grant compared (blake3::Hash compares in constant time), no early exit.
        let mut found = None;
        for grant in grants.iter() {
            if grant.hash == presented {
                found = Some(grant);
            }
        }
        found.map(|g| g.caller.clone()).ok_or_else(|| {
            tonic::Status::unauthenticated(
                "the bearer token is not valid here: no grant of this service's tokens file \
                 holds it (revoked, mistyped, or meant for another service)",
            )
        })
    }

    /// Lets `request` in (a health check always) when it presents a granted token, and
    /// puts the grant's [`Caller`] into its extensions for the handlers' [`authorize`];
    /// the caller, or `None` for a health check.
    pub fn admit<B>(
        &self,
        request: &mut http::Request<B>,
    ) -> Result<Option<Caller>, tonic::Status> {
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Ok(None);
        }
        let caller = self.authenticate(request.headers().get(http::header::AUTHORIZATION))?;
        request.extensions_mut().insert(caller.clone());
        Ok(Some(caller))
    }

    /// Reads the file again if it changed since last read; an error leaves the grants as
    /// they were.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = stamp(&self.path);
        if now == *self.stamp.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(false);
        }
        *self.stamp.write().unwrap_or_else(|e| e.into_inner()) = now;
        let grants = read(&self.path)?;
        *self.grants.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(grants);
        Ok(true)
    }

    /// The file the grants come from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether the token that let a call in (its [`Caller`] in the request's extensions, put
/// there when tokens are required) allows `action` on model `name`: `PERMISSION_DENIED`
/// naming the grant's scope when it does not; `Ok` when no tokens are required.
pub fn authorize(
    extensions: &http::Extensions,
    action: Action,
    name: Option<&str>,
) -> Result<(), tonic::Status> {
    match extensions.get::<Caller>() {
        Some(caller) => caller.allows(action, name),
        None => Ok(()),
    }
}

/// Reads the tokens file again whenever it changes (checked every
/// [`FILES_CHECKED_EVERY`](crate::FILES_CHECKED_EVERY)) until the task
/// is dropped: a token removed from it is refused from the next call on; a file that no
/// longer parses is logged and the grants read before stay in force.
pub async fn watch(tokens: Arc<Tokens>) {
    loop {
        tokio::time::sleep(crate::FILES_CHECKED_EVERY).await;
        match tokens.reload_if_changed() {
            Ok(true) => tracing::info!(file = %tokens.path().display(), "tokens file read again"),
            Ok(false) => {}
            Err(e) => tracing::error!("{e}; the tokens read before stay in force"),
        }
    }
}

/// A token read from a file (`--token-file`, `--peer-token-file`): its one line, trimmed.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(format!(
            "token file {} must hold one token on one line",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// The `authorization` header that presents `token`.
pub fn bearer(token: &str) -> Result<http::HeaderValue, String> {
    http::HeaderValue::from_str(&format!("Bearer {token}"))
        .map(|mut v| {
            v.set_sensitive(true);
            v
        })
        .map_err(|_| "a token must be printable ASCII".to_owned())
}

/// A gRPC channel (any HTTP service) that presents a bearer token, when it has one, with
/// every request it sends.
#[derive(Clone, Debug)]
pub struct WithToken<S> {
    pub inner: S,
    pub token: Option<http::HeaderValue>,
}

impl<S, B> tower_service::Service<http::Request<B>> for WithToken<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> S::Future {
        if let Some(token) = &self.token {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, token.clone());
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn lines_name_tokens_actions_and_prefixes() {
        let grants = parse(
            "# comment\n\nplain-token-0123456789\nops:ops-token-0123456789\n\
             team-a:team-a-token-012345:fetch,prefetch:org-a/,shared/\n",
        )
        .unwrap();
        assert_eq!(grants.len(), 3);
        assert_eq!(grants[0].caller.name, "line 3");
        assert_eq!(grants[1].caller.actions, None);
        let team = &grants[2].caller;
        assert_eq!(team.actions, Some(vec![Action::Fetch, Action::Prefetch]));
        assert!(team.allows(Action::Fetch, Some("org-a/bert")).is_ok());
        assert!(team.allows(Action::Fetch, Some("shared/x")).is_ok());
        let outside = team.allows(Action::Fetch, Some("org-b/bert")).unwrap_err();
        assert_eq!(outside.code(), tonic::Code::PermissionDenied);
        assert!(outside.message().contains("org-a/, shared/"), "{outside:?}");
        let admin = team.allows(Action::Admin, None).unwrap_err();
        assert_eq!(admin.code(), tonic::Code::PermissionDenied);
        assert!(admin.message().contains("may not admin"), "{admin:?}");
    }

    #[test]
    fn malformed_lines_are_named() {
        for (text, says) in [
            ("a:short", "line 1: the token of \"a\" is shorter than 16"),
            (
                "a:0123456789abcdef:delete",
                "line 1: unknown action \"delete\"",
            ),
            ("a:0123456789abcdef:fetch:p:q", "line 1: more than four"),
            (
                "\na:0123456789abcdef\na:fedcba9876543210",
                "line 3: the name \"a\" is given twice",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn only_a_granted_token_is_let_in_and_a_rewrite_revokes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "a:token-a-0123456789\nb:token-b-0123456789\n").unwrap();
        let tokens = Tokens::load(&path).unwrap();
        let caller = tokens
            .authenticate(Some(&bearer("token-b-0123456789")))
            .unwrap();
        assert_eq!(caller.name, "b");
        for refused in [
            tokens.authenticate(None),
            tokens.authenticate(Some(&bearer("token-c-0123456789"))),
        ] {
            assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
        }
        std::fs::write(&path, "a:token-a-0123456789\n").unwrap();
        assert!(tokens.reload_if_changed().unwrap());
        assert!(
            tokens
                .authenticate(Some(&bearer("token-b-0123456789")))
                .is_err()
        );
        // A file that no longer parses leaves the grants in force.
        std::fs::write(&path, "a:short\n").unwrap();
        assert!(tokens.reload_if_changed().is_err());
        assert!(
            tokens
                .authenticate(Some(&bearer("token-a-0123456789")))
                .is_ok()
        );
    }
}
