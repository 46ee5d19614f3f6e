//! Label-selector and glob matching, shared by the webhook (which pods to inject), the
//! broker (which policy applies to a caller) and the operator (conflicts).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector`, with Kubernetes semantics: `{}` matches
/// everything, all requirements are ANDed, and an unknown operator matches nothing
/// (fail closed rather than inject or grant by accident).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|req| {
        let values = req.values.as_deref().unwrap_or_default();
        let value = labels.get(&req.key);
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// Whether `selector` has no requirement at all (and so selects every pod).
pub fn selector_is_empty(selector: &LabelSelector) -> bool {
    selector.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && selector.match_expressions.as_ref().is_none_or(|m| m.is_empty())
}

/// Whether `value` matches `pattern`, where `*` stands for any run of characters
/// (including none) and everything else is literal. Iterative, linear in practice, so a
/// hostile pattern or value cannot blow up.
pub fn glob_matches(pattern: &str, value: &str) -> bool {
    let (p, v) = (pattern.as_bytes(), value.as_bytes());
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, vi));
            pi += 1;
        } else if pi < p.len() && p[pi] == v[vi] {
            pi += 1;
            vi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Whether a host matches a host pattern: exact (case-insensitive), or `*.suffix`
/// matching any host with at least one more label in front of `suffix`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => host == pattern.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selector_semantics() {
        let app = labels(&[("app", "web"), ("tier", "front")]);
        assert!(selector_matches(&LabelSelector::default(), &app), "{{}} selects all");
        let by_label = LabelSelector { match_labels: Some(labels(&[("app", "web")])), ..Default::default() };
        assert!(selector_matches(&by_label, &app));
        assert!(!selector_matches(&by_label, &labels(&[("app", "db")])));
        let cases = [
            (req("tier", "In", &["front", "edge"]), true),
            (req("tier", "NotIn", &["front"]), false),
            (req("missing", "NotIn", &["x"]), true),
            (req("app", "Exists", &[]), true),
            (req("app", "DoesNotExist", &[]), false),
            (req("app", "Matches", &["web"]), false),
        ];
        for (r, want) in cases {
            let sel = LabelSelector { match_expressions: Some(vec![r.clone()]), ..Default::default() };
            assert_eq!(selector_matches(&sel, &app), want, "{r:?}");
        }
    }

    #[test]
    fn globs() {
        for (p, v, want) in [
            ("*", "", true),
            ("app-*", "app-reader", true),
            ("app-*", "ap", false),
            ("arn:aws:iam::*:role/app-*", "arn:aws:iam::123456789012:role/app-x", true),
            ("*@p.iam.gserviceaccount.com", "sa@p.iam.gserviceaccount.com", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_matches(p, v), want, "{p} vs {v}");
        }
        let hostile = "*a".repeat(50);
        assert!(!glob_matches(&hostile, &"a".repeat(40)), "terminates and refuses");
    }

    #[test]
    fn hosts() {
        assert!(host_matches("*.s3.amazonaws.com", "bucket.s3.amazonaws.com"));
        assert!(host_matches("*.s3.amazonaws.com", "BUCKET.S3.amazonaws.com."));
        assert!(!host_matches("*.s3.amazonaws.com", "s3.amazonaws.com"));
        assert!(!host_matches("*.s3.amazonaws.com", "evil-s3.amazonaws.com"));
        assert!(host_matches("api.example.com", "API.example.com"));
        assert!(!host_matches("api.example.com", "api.example.com.evil.io"));
    }
}
