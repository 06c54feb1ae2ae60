//! The controller's grants, asked of the real API server: the chart's RBAC and its admission
//! policies for the controller (charts/rolemesh/templates/controller-admissionpolicy.yaml),
//! applied alone under a release name of the test's own. SubjectAccessReviews show what RBAC
//! grants; requests made as the controller's ServiceAccount (impersonated) show what the
//! admission policies then refuse. docs/security-model.md names this test.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::{ConfigMap, ServiceAccount},
};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use rolemesh_testkit::{ClusterEnv, TestNamespace, eventually, in_namespace, repo_root};
use serde_json::json;

const STS: &str = "sts.amazonaws.com";
const TRUST_BUNDLE: &str = rolemesh_crds::names::TRUST_BUNDLE_CONFIGMAP;
/// The controller's CA certificate ConfigMap in its namespace (controller/src/ca.rs).
const CA_CONFIGMAP: &str = "rolemesh-ca";

/// Deletes what the test applied, cluster-scoped objects included, however the test ends.
struct Applied {
    env: ClusterEnv,
    manifest: String,
}

impl Drop for Applied {
    fn drop(&mut self) {
        let deleted = self.env.run(
            "kubectl",
            &["delete", "--ignore-not-found", "--wait=false", "-f", "-"],
            Some(&self.manifest),
        );
        match deleted {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "could not delete the test's RBAC and admission policies:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(error) => {
                eprintln!("could not delete the test's RBAC and admission policies: {error:#}")
            }
        }
    }
}

/// The chart's RBAC and controller admission policies for `release` in `namespace`, and nothing
/// else (no Deployment: nothing runs as the controller but this test).
fn render(env: &ClusterEnv, release: &str, namespace: &str) -> Result<String> {
    let chart = repo_root().join("charts/rolemesh");
    let chart = chart.to_string_lossy();
    let args = [
        "template",
        release,
        &chart,
        "-n",
        namespace,
        "--kube-version",
        "1.34.4",
        "--show-only",
        "templates/rbac.yaml",
        "--show-only",
        "templates/controller-admissionpolicy.yaml",
    ];
    let output = env.run("helm", &args, None)?;
    rolemesh_testkit::expect_success("helm", &args, &output)
}

async fn allowed(
    client: &Client,
    user: &str,
    verb: &str,
    resource: &str,
    namespace: &str,
    name: Option<&str>,
) -> Result<bool> {
    // What the API server adds when it authenticates a ServiceAccount.
    let account_namespace = user.split(':').nth(2).unwrap_or_default();
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{account_namespace}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(String::new()),
                resource: Some(resource.split('/').next().unwrap_or(resource).into()),
                subresource: resource.split('/').nth(1).map(String::from),
                namespace: Some(namespace.into()),
                name: name.map(String::from),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.map(|s| s.allowed).unwrap_or(false))
}

/// A client that acts as `user` (a ServiceAccount's user name), as the controller's pod would.
async fn client_as(env: &ClusterEnv, user: &str) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(env.kubeconfig())?;
    let mut config =
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.auth_info.impersonate = Some(user.to_string());
    Ok(Client::try_from(config)?)
}

/// `kubectl ARGS --as USER`: whether it succeeded, and stdout when it did (stdout and stderr
/// when it did not).
fn kubectl_as(env: &ClusterEnv, user: &str, args: &[&str]) -> Result<(bool, String)> {
    let mut all = args.to_vec();
    all.extend(["--as", user]);
    let out = env.run("kubectl", &all, None)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok((true, stdout));
    }
    Ok((false, stdout + &String::from_utf8_lossy(&out.stderr)))
}

/// `kubectl create token SA -n NAMESPACE --audience A... --duration D --as USER`.
fn token_as(
    env: &ClusterEnv,
    user: &str,
    namespace: &str,
    account: &str,
    audiences: &[&str],
    duration: &str,
) -> Result<(bool, String)> {
    let mut args = vec![
        "create",
        "token",
        account,
        "-n",
        namespace,
        "--duration",
        duration,
    ];
    for audience in audiences {
        args.extend(["--audience", audience]);
    }
    kubectl_as(env, user, &args)
}

/// The claims of a JWT, unverified: only to see what the API server minted.
fn claims(token: &str) -> Result<serde_json::Value> {
    let payload = token
        .trim()
        .split('.')
        .nth(1)
        .context("a token has three parts")?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    Ok(serde_json::from_slice(&json)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_gets_only_the_configmaps_and_tokens_it_uses() -> Result<()> {
    in_namespace("rbac", |ns| async move {
        let release = format!("rb{}", &ns.name[ns.name.len() - 8..]);
        let manifest = render(&ns.env, &release, &ns.name)?;
        ensure!(
            manifest.contains("kind: ValidatingAdmissionPolicy\n")
                && manifest.contains("kind: ClusterRole\n"),
            "the chart renders the RBAC and the controller's admission policies:\n{manifest}"
        );
        let applied = Applied {
            env: ns.env.clone(),
            manifest: manifest.clone(),
        };
        ns.apply_manifest(&manifest)?;
        let result = checks(&ns, &release).await;
        drop(applied);
        result
    })
    .await
    .context("controller RBAC test")
}

async fn checks(ns: &TestNamespace, release: &str) -> Result<()> {
    let env = &ns.env;
    let controller = format!(
        "system:serviceaccount:{}:{release}-rolemesh-controller",
        ns.name
    );
    let mut app = ServiceAccount::default();
    app.metadata.name = Some("app".into());
    ns.api::<ServiceAccount>()
        .create(&PostParams::default(), &app)
        .await?;

    // An admission policy takes a moment to be in force after it is created; the requests that
    // show each one in force are a refusal of a kind RBAC would grant.
    let refusal = eventually(
        "the token policy refuses another audience",
        Duration::from_secs(60),
        || async {
            let (ok, text) = token_as(env, &controller, &ns.name, "app", &["other"], "10m")?;
            Ok((!ok && text.contains("only for the audience sts.amazonaws.com")).then_some(text))
        },
    )
    .await?;
    ensure!(
        refusal.contains("[other]")
            && refusal.contains(&format!("{release}-rolemesh-controller-tokens")),
        "the refusal names the audience asked for and the policy:\n{refusal}"
    );
    let not_rolemesh = [
        "create",
        "configmap",
        "not-rolemesh",
        "-n",
        &ns.name,
        "--dry-run=server",
    ];
    let refusal = eventually(
        "the ConfigMap policy refuses not-rolemesh",
        Duration::from_secs(60),
        || async {
            let (ok, text) = kubectl_as(env, &controller, &not_rolemesh)?;
            Ok((!ok && text.contains("creates only the ConfigMaps")).then_some(text))
        },
    )
    .await?;
    ensure!(
        refusal.contains(&format!("{}/not-rolemesh", ns.name))
            && refusal.contains(&format!("{release}-rolemesh-controller-configmaps")),
        "ConfigMap not-rolemesh in the controller's namespace (where RBAC lets it create): refused by the policy, naming it\n{refusal}"
    );
    let (ok, text) = token_as(env, &controller, &ns.name, "app", &[], "10m")?;
    ensure!(
        !ok && text.contains("sts.amazonaws.com"),
        "no audience means the API server's own: refused\n{text}"
    );
    let both = ["sts.amazonaws.com", "other"];
    let (ok, text) = token_as(env, &controller, &ns.name, "app", &both, "10m")?;
    ensure!(
        !ok && text.contains("only for the audience"),
        "sts plus another audience: refused\n{text}"
    );
    let (ok, text) = token_as(env, &controller, &ns.name, "app", &[STS], "1h")?;
    ensure!(
        !ok && text.contains("at most 600 seconds") && text.contains("3600"),
        "an hour-long token: refused\n{text}"
    );
    let (ok, text) = token_as(env, &controller, "kube-system", "default", &[STS], "10m")?;
    ensure!(
        !ok && text.contains("in kube-system"),
        "a token for a kube-system ServiceAccount: refused\n{text}"
    );

    let (ok, token) = token_as(env, &controller, &ns.name, "app", &[STS], "10m")?;
    ensure!(
        ok,
        "the controller's own request (controller/src/identity.rs) is admitted:\n{token}"
    );
    let claims = claims(&token)?;
    ensure!(
        claims["aud"] == json!(["sts.amazonaws.com"])
            && claims["sub"] == json!(format!("system:serviceaccount:{}:app", ns.name))
            && claims["exp"]
                .as_i64()
                .zip(claims["iat"].as_i64())
                .is_some_and(|(exp, iat)| exp - iat <= 600),
        "a 10-minute sts.amazonaws.com token of app: {claims}"
    );
    // Someone else (here the cluster admin running the test) is not affected.
    let admin = env.run(
        "kubectl",
        &[
            "create",
            "token",
            "app",
            "-n",
            &ns.name,
            "--audience",
            "other",
            "--duration",
            "10m",
        ],
        None,
    )?;
    rolemesh_testkit::expect_success("kubectl", &["create", "token"], &admin)?;

    // ConfigMaps, as RBAC sees them.
    let client = &ns.client;
    let may = |verb: &'static str, namespace: &str, name: Option<&'static str>| {
        let (client, controller, namespace) =
            (client.clone(), controller.clone(), namespace.to_string());
        async move { allowed(&client, &controller, verb, "configmaps", &namespace, name).await }
    };
    for namespace in ["default", ns.name.as_str()] {
        ensure!(
            may("patch", namespace, Some(TRUST_BUNDLE)).await?,
            "patch {namespace}/{TRUST_BUNDLE}"
        );
        ensure!(
            may("create", namespace, Some(TRUST_BUNDLE)).await?,
            "create (by apply) {namespace}/{TRUST_BUNDLE}"
        );
    }
    for verb in ["get", "update", "patch", "delete"] {
        ensure!(
            !may(verb, "kube-system", Some("aws-auth")).await?,
            "the controller must not {verb} kube-system/aws-auth"
        );
    }
    for verb in ["get", "list", "watch", "create"] {
        ensure!(
            !may(verb, "kube-system", None).await?,
            "the controller must not {verb} ConfigMaps in kube-system"
        );
    }
    ensure!(
        !may("update", "default", Some(TRUST_BUNDLE)).await?,
        "the trust bundle is written by apply only"
    );
    ensure!(
        !may("delete", "default", Some(TRUST_BUNDLE)).await?,
        "nor deleted"
    );
    ensure!(
        may("get", &ns.name, Some(CA_CONFIGMAP)).await?,
        "reads its CA ConfigMap"
    );
    ensure!(
        may("update", &ns.name, Some(CA_CONFIGMAP)).await?,
        "replaces its CA ConfigMap"
    );
    ensure!(
        may("create", &ns.name, None).await?,
        "creates ConfigMaps in its namespace (names limited by the policy)"
    );
    ensure!(
        !may("update", &ns.name, Some("someone-else")).await?,
        "no other ConfigMap in its namespace"
    );
    ensure!(
        !may("get", "default", Some(CA_CONFIGMAP)).await?,
        "the CA ConfigMap only in its namespace"
    );
    let token_ok = allowed(
        client,
        &controller,
        "create",
        "serviceaccounts/token",
        "default",
        Some("x"),
    )
    .await?;
    ensure!(
        token_ok,
        "RBAC lets the controller request tokens for any ServiceAccount (the policy limits them)"
    );

    // ConfigMaps, as the controller writes them (the same calls as controller/src/ca.rs and
    // controller/src/policy/writes.rs).
    let as_controller = client_as(env, &controller).await?;
    let here: Api<ConfigMap> = Api::namespaced(as_controller.clone(), &ns.name);
    let mut ca = ConfigMap::default();
    ca.metadata.name = Some(CA_CONFIGMAP.into());
    ca.data = Some([("ca.crt".to_string(), "x".to_string())].into());
    let created = here
        .create(&PostParams::default(), &ca)
        .await
        .context("the controller creates rolemesh-ca")?;
    here.replace(CA_CONFIGMAP, &PostParams::default(), &created)
        .await
        .context("and replaces it")?;
    here.get(CA_CONFIGMAP).await.context("and reads it")?;
    let bundle = |namespace: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": TRUST_BUNDLE, "namespace": namespace}, "data": {"ca.crt": "x"}})
    };
    let apply = PatchParams::apply("rolemesh-controller").force();
    for _ in 0..2 {
        here.patch(TRUST_BUNDLE, &apply, &Patch::Apply(bundle(&ns.name)))
            .await
            .context("the controller creates, then updates, the trust bundle by apply")?;
    }
    // Each policy's peer rules, a key of the same ConfigMap, by server-side apply as the policy's
    // own field manager (controller/src/policy/writes.rs apply_peer_rules), also where it creates
    // the ConfigMap.
    let rules = PatchParams::apply(&rolemesh_crds::names::rules_field_manager("web")).force();
    let rules_body = |namespace: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": TRUST_BUNDLE, "namespace": namespace}, "data": {"policy.web.json": "{}"}})
    };
    here.patch(TRUST_BUNDLE, &rules, &Patch::Apply(rules_body(&ns.name)))
        .await
        .context("the controller writes a policy's peer rules into the trust bundle")?;
    elsewhere_rules(&as_controller, &rules, rules_body("default")).await?;
    // Another policy's key, under its own manager, leaves the first in place.
    let other = PatchParams::apply(&rolemesh_crds::names::rules_field_manager("api")).force();
    here.patch(
        TRUST_BUNDLE,
        &other,
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                             "metadata": {"name": TRUST_BUNDLE}, "data": {"policy.api.json": "{}"}})),
    )
    .await
    .context("a second policy's rules")?;
    // Read as the test (the controller may not read ConfigMaps).
    let admin: Api<ConfigMap> = ns.api();
    let written = admin.get(TRUST_BUNDLE).await?.data.unwrap_or_default();
    ensure!(
        written.get("ca.crt").map(String::as_str) == Some("x")
            && written.contains_key("policy.web.json")
            && written.contains_key("policy.api.json"),
        "each policy's rules key is added beside ca.crt: {written:?}"
    );
    here.patch(TRUST_BUNDLE, &apply, &Patch::Apply(bundle(&ns.name)))
        .await
        .context("a later trust bundle apply")?;
    ensure!(
        admin
            .get(TRUST_BUNDLE)
            .await?
            .data
            .unwrap_or_default()
            .contains_key("policy.web.json"),
        "an apply of ca.crt keeps the rules keys another field manager wrote"
    );
    let elsewhere: Api<ConfigMap> = Api::namespaced(as_controller.clone(), "default");
    let dry_apply = PatchParams::apply("rolemesh-controller").force().dry_run();
    elsewhere
        .patch(TRUST_BUNDLE, &dry_apply, &Patch::Apply(bundle("default")))
        .await
        .context("the controller applies the trust bundle in another namespace (dry run)")?;

    let (ok, text) = kubectl_as(
        env,
        &controller,
        &[
            "create",
            "configmap",
            "not-rolemesh",
            "-n",
            "default",
            "--dry-run=server",
        ],
    )?;
    ensure!(
        !ok && text.contains("forbidden"),
        "ConfigMap not-rolemesh elsewhere: refused by RBAC\n{text}"
    );
    let (ok, text) = kubectl_as(
        env,
        &controller,
        &[
            "create",
            "configmap",
            CA_CONFIGMAP,
            "-n",
            "default",
            "--dry-run=server",
        ],
    )?;
    ensure!(
        !ok && text.contains("forbidden"),
        "rolemesh-ca outside its namespace: refused\n{text}"
    );
    let aws_auth: Api<ConfigMap> = Api::namespaced(as_controller, "kube-system");
    let written = aws_auth
        .patch(
            "aws-auth",
            &dry_apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "aws-auth", "namespace": "kube-system"}, "data": {"mapRoles": "x"}})),
        )
        .await;
    ensure!(
        matches!(&written, Err(kube::Error::Api(status)) if status.code == 403),
        "the controller cannot write kube-system/aws-auth: {written:?}"
    );
    Ok(())
}

/// A policy's rules applied where no trust bundle exists yet: the apply creates the ConfigMap
/// (dry run, in a namespace the test does not own).
async fn elsewhere_rules(
    client: &kube::Client,
    params: &PatchParams,
    body: serde_json::Value,
) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut dry = params.clone();
    dry.dry_run = true;
    api.patch(TRUST_BUNDLE, &dry, &Patch::Apply(body))
        .await
        .context("the controller's rules apply creates the trust bundle ConfigMap (dry run)")?;
    Ok(())
}
