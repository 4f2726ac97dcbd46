//! deploy/ stays true to the code: every metric the dashboard, alerts, alert tests and README
//! name is one a running gateway exports; the Dockerfile builds and runs the real binary on the
//! real ports; the ConfigMap's config parses. (deploy/check.sh runs the external linters.)

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use feishu_reply_gateway::config::Config;
use feishu_reply_gateway::fake_feishu::FakeOptions;

fn read(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `feishu_reply_…` tokens in a text.
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("feishu_reply_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        if name.len() > "feishu_reply_".len() {
            out.insert(name.trim_end_matches('_').to_owned());
        }
        rest = &tail[end..];
    }
    out
}

#[tokio::test]
async fn every_metric_named_in_deploy_and_readme_is_exported() {
    // With a budget: its metrics exist for apps that have one.
    let gw = common::spawn_gateway(
        FakeOptions::default(),
        "[apps.default.budget]\ncalls = 1000000\nperiod = \"month\"\n",
    )
    .await;
    gw.reply(common::text("om_d", "oc_d", "x")).await.unwrap();
    let (_, scrape) = gw.http_get("/metrics").await;
    let mut exported = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            exported.insert(rest.split(' ').next().unwrap().to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            exported.insert(line.split(['{', ' ']).next().unwrap().to_owned());
        }
    }
    for file in [
        "deploy/grafana/dashboard.json",
        "deploy/prometheus/alerts.yaml",
        "deploy/prometheus/alerts.test.yaml",
        "README.md",
        "BENCHMARKS.md",
    ] {
        let named = metric_tokens(&read(file));
        assert!(
            !named.is_empty() || file.ends_with("BENCHMARKS.md"),
            "{file} names no metric?"
        );
        let missing: Vec<_> = named.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics the gateway does not export: {missing:?}"
        );
    }
}

#[test]
fn the_dockerfile_builds_and_runs_the_real_binary_on_the_real_ports() {
    let cargo = read("Cargo.toml");
    let manifest: toml::Table = toml::from_str(&cargo).unwrap();
    let bin = manifest["bin"].as_array().unwrap()[0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let docker = read("deploy/Dockerfile");
    let builds: Vec<&str> = docker
        .lines()
        .filter(|l| l.contains("cargo build"))
        .collect();
    assert!(!builds.is_empty());
    for b in &builds {
        assert!(
            b.contains("--release")
                && b.contains("--locked")
                && b.contains(&format!("--bin {bin}")),
            "{b}"
        );
    }
    assert!(
        docker.contains(&format!("target/release/{bin}")),
        "copies the built binary"
    );
    let installed = format!("/usr/local/bin/{bin}");
    let entry = docker
        .lines()
        .find(|l| l.starts_with("ENTRYPOINT"))
        .expect("ENTRYPOINT");
    assert!(entry.contains(&installed), "{entry}");
    assert!(docker.contains(&format!("COPY --from=build /{bin} {installed}")));
    let defaults = Config::defaults();
    let expose = docker
        .lines()
        .find(|l| l.starts_with("EXPOSE"))
        .expect("EXPOSE");
    for port in [defaults.grpc_addr.port(), defaults.metrics_addr.port()] {
        assert!(expose.contains(&port.to_string()), "{expose} lacks {port}");
    }
    // HEALTHCHECK uses the binary's own `probe`, no extra tool in the image.
    let health = docker
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .nth(1)
        .unwrap_or("");
    assert!(
        health.contains(&installed) && health.contains("\"probe\""),
        "{health}"
    );
    // The runtime image runs as non-root.
    assert!(
        docker
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root"))
    );
}

#[test]
fn the_configmap_config_parses_and_its_secret_env_is_provided() {
    let cm = read("deploy/k8s/configmap.yaml");
    let start = cm.find("gateway.toml: |").expect("gateway.toml key") + "gateway.toml: |".len();
    let toml_text: String = cm[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let deployment = read("deploy/k8s/deployment.yaml");
    let mut secret_vars = Vec::new();
    let text = toml_text
        .lines()
        .map(|l| {
            if let Some(var) = l.trim().strip_prefix("app_secret_env = ") {
                secret_vars.push(var.trim_matches('"').to_owned());
                "app_secret = \"from-the-secret\"".to_owned()
            } else if let Some(var) = l.trim().strip_prefix("token_env = ") {
                secret_vars.push(var.trim_matches('"').to_owned());
                format!("token_sha256 = \"{}\"", "ab".repeat(32))
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(!config.apps.is_empty());
    // Callers are configured: the gateway starts (no anonymous access) and checks tokens.
    assert!(!config.auth.callers.is_empty() && !config.auth.allow_anonymous);
    assert!(!secret_vars.is_empty());
    for var in secret_vars {
        assert!(
            deployment.contains(&format!("name: {var}")),
            "deployment does not set {var}"
        );
    }
    assert!(deployment.contains("name: GATEWAY_REDIS_URL"));
    // The pod may be killed only after the drain: preStop + grace + one send (whose bound is
    // twice the request timeout: a token fetch and the post).
    let grace_s: u64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .unwrap()
        .parse()
        .unwrap();
    let needed = 5 + config.shutdown_grace.as_secs() + 2 * config.feishu.request_timeout.as_secs();
    assert!(
        grace_s > needed,
        "terminationGracePeriodSeconds {grace_s} <= {needed}"
    );
}

#[test]
fn applying_the_manifests_overwrites_no_secret_and_redis_is_locked_down() {
    // `kubectl apply -k deploy/k8s` once applied the example Secret over the real one.
    let kustomization = read("deploy/k8s/kustomization.yaml");
    let listed_secret = kustomization
        .lines()
        .filter(|l| l.trim_start().starts_with("- "))
        .any(|l| l.contains("secret"));
    assert!(!listed_secret, "{kustomization}");
    for entry in std::fs::read_dir("deploy/k8s").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                !text.contains("kind: Secret"),
                "{} defines a Secret",
                path.display()
            );
        }
    }
    // Redis: a password from a Secret, and live quota windows are never evicted.
    let redis = read("deploy/k8s/redis.yaml");
    assert!(
        redis.contains("\"--requirepass\", \"$(REDIS_PASSWORD)\""),
        "{redis}"
    );
    assert!(redis.contains("\"noeviction\""), "{redis}");
    // Jobs are accepted work: on disk (AOF, fsync before every answer) on a volume that
    // outlives the pod.
    assert!(
        redis.contains("\"--appendonly\", \"yes\", \"--appendfsync\", \"always\""),
        "{redis}"
    );
    assert!(redis.contains("volumeClaimTemplates:"), "{redis}");
    assert!(!redis.contains("emptyDir"), "{redis}");
    assert!(!redis.contains("volatile-ttl") && !redis.contains("allkeys-"));
    // Who may talk to the gateway and to Redis is declared.
    let netpol = read("deploy/k8s/networkpolicy.yaml");
    assert!(kustomization.contains("networkpolicy.yaml"));
    assert_eq!(netpol.matches("kind: NetworkPolicy").count(), 2);
}
