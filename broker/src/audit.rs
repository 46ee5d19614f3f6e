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

/// One decision.
#[derive(Serialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// Always `cloudpass.dev/audit`, to tell records from log lines.
    pub kind: &'static str,
    /// When the request arrived (RFC 3339).
    pub time: String,
    /// Random ID, also in the answer's `x-cloudpass-decision` header.
    pub decision_id: String,
    /// Namespace whose policy applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Calling pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Its UID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Its service account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The issuer of the caller's token when it is another cluster's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_issuer: Option<String>,
    /// The caller's namespace in that cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_namespace: Option<String>,
    /// Policy asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Trust providers and their results, in the policy's order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_providers: Vec<TrustResult>,
    /// Credential provider used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_provider: Option<String>,
    /// Its kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_kind: Option<&'static str>,
    /// `allowed`, `denied` or `error`.
    pub outcome: &'static str,
    /// Error code when not allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// Why not allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The upstream's error code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_code: Option<String>,
    /// `hit`, `miss` or `coalesced`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
    /// Expiry of the credential handed out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Milliseconds spent deciding.
    pub latency_ms: f64,
}

enum Sink {
    Stdout,
    File(Mutex<LineWriter<File>>),
}

/// Where records go.
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
