//! The audit trail: one JSON line per broker decision, never a token or secret.
//!
//! Records go to their own sink (stdout by default, or a file), separate from the
//! operational log, so that they can be shipped and retained on their own terms.

use std::{
    fs::File,
    io::{LineWriter, Write},
    path::Path,
    sync::Mutex,
};

use serde::Serialize;

use crate::trust::TrustResult;

/// The audit record of one decision, written as one JSON line whether the credential was
/// handed out or refused. Holds names and outcomes, never a token, credential or secret.
#[derive(Serialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// Always `cloudpass.dev/audit`, to tell records from log lines.
    pub kind: &'static str,
    /// When the request arrived (RFC 3339).
    pub time: String,
    /// Random ID, also in the answer's `x-cloudpass-decision` header.
    pub decision_id: String,
    /// The caller's namespace, whose policy applies (set once the caller is known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The calling pod's name, from the verified token (absent for another cluster's
    /// callers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The calling pod's UID, checked against the pod the token is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The service account the caller runs as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The issuer of the caller's token when it is another cluster's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_issuer: Option<String>,
    /// The caller's namespace in that cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_namespace: Option<String>,
    /// The AccessPolicy named in the request (recorded even when it does not exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Trust providers and their results, in the policy's order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_providers: Vec<TrustResult>,
    /// The CredentialProvider of the policy, once trust and conditions passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_provider: Option<String>,
    /// The CredentialProvider's kind (`awsSts`, `apiKey`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_kind: Option<&'static str>,
    /// For the secret-store kinds: the secret and version handed out, never its value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// `allowed`; `denied` for a 403; `error` for every other refusal.
    pub outcome: &'static str,
    /// The refusal's wire code (`Unauthenticated`, `Denied`, ...,
    /// [`cloudpass_api::broker::ErrorCode::as_str`]); absent when allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// The refusal's message, as the caller got it; absent when allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The upstream service's own error code (sanitized), for upstream failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_code: Option<String>,
    /// How the credential cache answered: `hit`, `miss` or `coalesced`
    /// ([`crate::cache::Lookup`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
    /// Expiry of the credential handed out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Milliseconds from the request's arrival to the decision, to the microsecond.
    pub latency_ms: f64,
}

enum Sink {
    Stdout,
    File(Mutex<LineWriter<File>>),
}

/// The audit sink: stdout (next to the logs) or a file records are appended to, one
/// line per record.
pub struct Audit {
    sink: Sink,
}

impl Audit {
    /// Records to stdout (`-` or `stdout`) or appended to a file.
    pub fn open(target: &str) -> std::io::Result<Self> {
        let sink = match target {
            "-" | "stdout" => Sink::Stdout,
            path => Sink::File(Mutex::new(LineWriter::new(
                File::options().create(true).append(true).open(Path::new(path))?,
            ))),
        };
        Ok(Self { sink })
    }

    /// Writes one record as one line.
    pub fn record(&self, record: &AuditRecord) {
        let mut line = serde_json::to_vec(record).expect("audit record serializes");
        line.push(b'\n');
        let result = match &self.sink {
            // One write under the stdout lock, so records never interleave with log lines.
            Sink::Stdout => std::io::stdout().lock().write_all(&line),
            Sink::File(f) => f.lock().unwrap_or_else(|e| e.into_inner()).write_all(&line),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot write an audit record");
        }
    }
}
