//! The webhook's reads of the API server for lookups its caches cannot answer, against a fake API
//! server that counts them: reviews crafted by anyone who reaches the endpoint must not turn into
//! one LIST each.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use axum::{Router, extract::Request, http::StatusCode, response::IntoResponse};
use rolemesh_webhook::{Error, lookup::Lookups, metrics::Metrics};

/// A fake API server: namespaced MTLSPolicy LISTs answer an empty list after `delay` (and are
/// counted); everything else (the reflectors' cluster-wide lists and watches) gets 503, so the
/// caches never sync and every lookup falls back to the API server.
async fn fake_api_server(delay: Duration) -> Result<(String, Arc<AtomicUsize>)> {
    let lists = Arc::new(AtomicUsize::new(0));
    let counted = lists.clone();
    let app = Router::new().fallback(move |request: Request| {
        let counted = counted.clone();
        async move {
            let path = request.uri().path().to_string();
            if path.starts_with("/apis/rolemesh.dev/v1alpha1/namespaces/")
                && path.ends_with("/mtlspolicies")
            {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                let body = r#"{"apiVersion":"rolemesh.dev/v1alpha1","kind":"MTLSPolicyList","metadata":{"resourceVersion":"1"},"items":[]}"#;
                return (
                    StatusCode::OK,
                    [("content-type", "application/json")],
                    body,
                )
                    .into_response();
            }
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, lists))
}

async fn lookups(url: &str) -> Result<(Lookups, Arc<Metrics>)> {
    let config = kube::Config::new(url.parse().context("fake API URL")?);
    let client = kube::Client::try_from(config)?;
    let metrics = Arc::new(Metrics::new());
    let lookups = Lookups::start(
        client,
        "default".into(),
        Some("mesh.test".into()),
        metrics.clone(),
    );
    Ok((lookups, metrics))
}

fn lookups_by(metrics: &Metrics, source: &str) -> f64 {
    rolemesh_testkit::metric_sum(
        &metrics.encode(),
        "rolemesh_webhook_policy_lookups_total",
        &format!("source=\"{source}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_of_one_namespace_share_one_list() -> Result<()> {
    let (url, lists) = fake_api_server(Duration::from_millis(300)).await?;
    let (lookups, metrics) = lookups(&url).await?;
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let lookups = lookups.clone();
            tokio::spawn(async move {
                lookups
                    .covering_policy("shop", &format!("sa-{i}"), "crafted")
                    .await
            })
        })
        .collect();
    for task in tasks {
        let refused = task.await?.expect_err("no policy covers the pod");
        ensure!(matches!(refused, Error::NotCovered { .. }), "{refused}");
    }
    let listed = lists.load(Ordering::SeqCst);
    ensure!(
        listed <= 2,
        "100 concurrent lookups of one namespace made {listed} LISTs"
    );
    ensure!(
        lookups_by(&metrics, "coalesced") >= 98.0,
        "{}",
        metrics.encode()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_of_many_namespaces_spend_a_bounded_budget() -> Result<()> {
    let (url, lists) = fake_api_server(Duration::ZERO).await?;
    let (lookups, metrics) = lookups(&url).await?;
    let started = std::time::Instant::now();
    let mut spent = 0;
    for i in 0..300 {
        match lookups
            .covering_policy(&format!("ns-{i}"), "default", "crafted")
            .await
        {
            Err(Error::ApiBudgetSpent { what }) => {
                spent += 1;
                ensure!(what.contains(&format!("ns-{i}")), "{what}");
            }
            Err(Error::NotCovered { .. }) => {}
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }
    let listed = lists.load(Ordering::SeqCst) as f64;
    let allowed = rolemesh_webhook::fallback::API_READS_BURST
        + rolemesh_webhook::fallback::API_READS_PER_SECOND * started.elapsed().as_secs_f64()
        + 1.0;
    ensure!(
        listed <= allowed,
        "300 lookups of distinct namespaces made {listed} LISTs (budget {allowed})"
    );
    ensure!(
        spent >= 300 - allowed as usize,
        "{spent} refused for the budget"
    );
    ensure!(lookups_by(&metrics, "throttled") >= spent as f64);
    // The budget refills: a lookup a moment later reaches the API server again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = lists.load(Ordering::SeqCst);
    let _ = lookups.covering_policy("later", "default", "p").await;
    ensure!(lists.load(Ordering::SeqCst) == before + 1);
    Ok(())
}

/// A fake API server whose caches sync with a stale view: every cluster-wide LIST answers the
/// namespaces as they were before `shop` opted in (`shop` without labels) and its watches never
/// deliver an event, while a GET of a namespace answers as the namespace is now (`shop` labelled
/// `rolemesh.dev/inject: enabled`). Counts those GETs.
async fn stale_cache_api_server() -> Result<(String, Arc<AtomicUsize>)> {
    let reads = Arc::new(AtomicUsize::new(0));
    let counted = reads.clone();
    let app = Router::new().fallback(move |request: Request| {
        let counted = counted.clone();
        async move {
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or_default().to_string();
            if query.contains("watch=true") {
                // The watch that would have brought the label never does.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return StatusCode::GATEWAY_TIMEOUT.into_response();
            }
            let json = |body: String| {
                (StatusCode::OK, [("content-type", "application/json")], body).into_response()
            };
            let list = |kind: &str, items: &str| {
                json(format!(
                    r#"{{"apiVersion":"v1","kind":"{kind}","metadata":{{"resourceVersion":"7"}},"items":[{items}]}}"#
                ))
            };
            match path.as_str() {
                "/api/v1/namespaces" => list(
                    "PartialObjectMetadataList",
                    r#"{"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadata","metadata":{"name":"shop","resourceVersion":"5"}},
                       {"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadata","metadata":{"name":"elsewhere","resourceVersion":"6"}}"#,
                ),
                "/api/v1/namespaces/shop" => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    json(r#"{"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadata","metadata":{"name":"shop","resourceVersion":"8","labels":{"rolemesh.dev/inject":"enabled"}}}"#.into())
                }
                "/api/v1/namespaces/elsewhere" => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    json(r#"{"apiVersion":"meta.k8s.io/v1","kind":"PartialObjectMetadata","metadata":{"name":"elsewhere","resourceVersion":"6"}}"#.into())
                }
                "/api/v1/serviceaccounts" => list("PartialObjectMetadataList", ""),
                "/apis/rolemesh.dev/v1alpha1/mtlspolicies" => list("MTLSPolicyList", ""),
                "/apis/rolemesh.dev/v1alpha1/mtlsauthorities" => list("MTLSAuthorityList", ""),
                _ => StatusCode::NOT_FOUND.into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, reads))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_opted_in_after_the_cache_synced_is_read_from_the_api_server() -> Result<()>
{
    let (url, reads) = stale_cache_api_server().await?;
    let (lookups, metrics) = lookups(&url).await?;
    rolemesh_testkit::eventually(
        "the caches to sync with the stale view",
        Duration::from_secs(10),
        || async { Ok(lookups.synced().then_some(())) },
    )
    .await?;
    // The cache says `shop` has not opted in; the API server says it has: its pods get the proxy.
    ensure!(
        lookups.namespace_opted_in("shop").await?,
        "a namespace opted in after the cache synced was taken as not opted in: its pods would be \
         admitted without their proxy"
    );
    ensure!(
        reads.load(Ordering::SeqCst) == 1,
        "one GET of the namespace"
    );
    ensure!(lookups_by(&metrics, "api") >= 1.0, "{}", metrics.encode());
    // A namespace that has not opted in, by the API server's word too, stays out.
    ensure!(!lookups.namespace_opted_in("elsewhere").await?);
    ensure!(reads.load(Ordering::SeqCst) == 2);
    // Past the read budget, a no the API server cannot confirm refuses the pod, never admits it
    // unmutated.
    let mut refused = false;
    for _ in 0..100 {
        match lookups.namespace_opted_in("elsewhere").await {
            Ok(false) => {}
            Err(Error::ApiBudgetSpent { what }) => {
                ensure!(what.contains("elsewhere"), "{what}");
                refused = true;
                break;
            }
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }
    ensure!(refused, "the budget was never spent by 100 reads");
    Ok(())
}
