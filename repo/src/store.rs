//! Opening the object store behind a repository URL: a directory path (or `file://PATH`)
//! through object_store's LocalFileSystem, `s3://BUCKET[/PREFIX]` through its AmazonS3.
//! Endpoint, region and credentials come from the usual AWS environment variables
//! (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, ...) and
//! `--s3-endpoint`; plain http is allowed only for loopback endpoints.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;

use crate::{RepoError, Result};

/// How to reach an S3 store (ignored for a directory).
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// `http(s)://HOST:PORT` of an S3-compatible server; default: AWS_ENDPOINT_URL or AWS.
    pub s3_endpoint: Option<String>,
    /// The key file of an encrypted repository (default: $TIDEMARK_REPO_KEY).
    pub key: Option<std::path::PathBuf>,
}

fn is_loopback(endpoint: &str) -> bool {
    let rest = endpoint.strip_prefix("http://").unwrap_or("");
    let host = rest.split(['/', ':']).next().unwrap_or("");
    matches!(host, "127.0.0.1" | "localhost" | "[::1]") || rest.starts_with("[::1]")
}

/// The store at `url`; `create` makes a missing directory.
pub fn open(url: &str, options: &StoreOptions, create: bool) -> Result<Arc<dyn ObjectStore>> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.len() < 3 {
            return Err(RepoError::Invalid(format!(
                "{url}: an S3 bucket name has at least 3 characters (s3://BUCKET/PREFIX)"
            )));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = options
            .s3_endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(endpoint) = endpoint {
            if endpoint.starts_with("http://") && !is_loopback(&endpoint) {
                return Err(RepoError::Invalid(format!(
                    "--s3-endpoint {endpoint}: plain http is allowed only to 127.0.0.1/localhost; \
                     use https"
                )));
            }
            builder = builder
                .with_allow_http(endpoint.starts_with("http://"))
                .with_endpoint(endpoint);
        }
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            builder = builder.with_region("us-east-1");
        }
        // A server that is down gives a clear error within about a minute, not after
        // object_store's default of three minutes of retries.
        let retry = object_store::RetryConfig {
            max_retries: 4,
            retry_timeout: std::time::Duration::from_secs(45),
            ..object_store::RetryConfig::default()
        };
        builder = builder.with_retry(retry);
        let s3 = builder.build().map_err(|source| RepoError::Store {
            what: format!(
                "configuring S3 for {url} (set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, \
                 for a non-AWS server, --s3-endpoint)"
            ),
            source,
        })?;
        let prefix = prefix.trim_matches('/');
        return Ok(if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        });
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if url.contains("://") && !url.starts_with("file://") {
        return Err(RepoError::Invalid(format!(
            "{url}: a repository is a directory path or s3://BUCKET/PREFIX"
        )));
    }
    if create {
        std::fs::create_dir_all(path).map_err(|e| {
            RepoError::Invalid(format!("creating the repository directory {path}: {e}"))
        })?;
    }
    let fs = LocalFileSystem::new_with_prefix(path).map_err(|source| RepoError::Store {
        what: format!("opening the repository directory {path} (does it exist?)"),
        source,
    })?;
    // Pack reads with O_DIRECT into reused buffers; everything else as LocalFileSystem does it.
    Ok(Arc::new(crate::local::DirectRanges::new(fs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_only_to_loopback() {
        assert!(is_loopback("http://127.0.0.1:8333"));
        assert!(is_loopback("http://localhost/x"));
        assert!(!is_loopback("http://10.0.0.1:8333"));
        assert!(!is_loopback("https://127.0.0.1"));
        let err = open("s3://ab", &StoreOptions::default(), false).unwrap_err();
        assert!(err.to_string().contains("3 characters"), "{err}");
        let opts = StoreOptions {
            s3_endpoint: Some("http://192.168.1.1:9000".into()),
            ..StoreOptions::default()
        };
        assert!(open("s3://bucket", &opts, false)
            .unwrap_err()
            .to_string()
            .contains("https"));
        assert!(open("gs://x", &StoreOptions::default(), false).is_err());
    }
}
