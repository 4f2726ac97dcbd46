//! A reloaded configuration lined up with the running one (live reload, SIGHUP or a file
//! change). Apps and callers keep their slots: the running process numbers them (queued
//! replies carry an app index and a caller id), so an app or caller that stays keeps its
//! number, a removed one leaves a tombstone in its slot (an app marked `removed`, a caller no
//! credential names), and new ones are appended. An app is the same app when its name and
//! app_id stay. Settings only a restart can change (ports,
//! TLS, Redis, the job store, the queue bounds, Feishu's address and timeouts, the chat, user,
//! message and card quotas, the finals' headroom) keep their running values and are named in [`LinedUp::needs_restart`].

use super::{AppConfig, AppGrant, CallerConfig, Config};

/// What a reload applies.
#[derive(Debug)]
pub struct LinedUp {
    /// The configuration to run now.
    pub config: Config,
    /// Settings that changed in the file but need a restart (still running as before).
    pub needs_restart: Vec<&'static str>,
    /// Slots of apps the reload removed (their queued replies fail).
    pub removed_apps: Vec<usize>,
}

/// Lines `new` (valid, as loaded) up with `old`, the configuration running.
pub fn line_up(old: &Config, new: Config) -> LinedUp {
    let mut new = new;
    let mut fresh = std::mem::take(&mut new.apps);
    let mut removed_apps = Vec::new();
    let mut apps: Vec<AppConfig> = Vec::with_capacity(old.apps.len() + fresh.len());
    for (slot, o) in old.apps.iter().enumerate() {
        // Same name and app_id: the same app. A name now on another app_id is another app
        // (its queued replies must not go out as the new one): the old slot is removed.
        match fresh
            .iter()
            .position(|n| n.name == o.name && n.app_id == o.app_id)
        {
            Some(i) => apps.push(fresh.remove(i)),
            None => {
                if !o.removed {
                    removed_apps.push(slot);
                }
                apps.push(AppConfig {
                    removed: true,
                    ..o.clone()
                });
            }
        }
    }
    apps.extend(fresh);
    new.apps = apps;

    let mut fresh = std::mem::take(&mut new.auth.callers);
    let mut callers: Vec<CallerConfig> = Vec::with_capacity(old.auth.callers.len() + fresh.len());
    for o in &old.auth.callers {
        match fresh.iter().position(|n| n.name == o.name) {
            Some(i) => callers.push(fresh.remove(i)),
            // No credential names it and it may use no app: nobody can call as it.
            None => callers.push(CallerConfig {
                token_sha256: None,
                tls_identities: Vec::new(),
                apps: AppGrant::Only(Vec::new()),
                admin: false,
                inherits_jobs: false,
                ..o.clone()
            }),
        }
    }
    callers.extend(fresh);
    new.auth.callers = callers;

    let mut needs_restart = Vec::new();
    macro_rules! keep {
        ($($field:ident).+, $name:literal) => {
            if new.$($field).+ != old.$($field).+ {
                needs_restart.push($name);
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!(grpc_addr, "server.grpc_addr");
    keep!(metrics_addr, "server.metrics_addr");
    keep!(shutdown_grace, "server.shutdown_grace_ms");
    keep!(limits, "server limits");
    keep!(tls, "server.tls");
    keep!(feishu, "feishu");
    keep!(queue, "queue");
    keep!(retry, "retry");
    keep!(cluster, "cluster");
    keep!(data_dir, "jobs.data_dir");
    keep!(reset_job_store, "--reset-job-store");
    keep!(max_jobs, "jobs.max_jobs");
    keep!(max_jobs_per_caller, "jobs.max_jobs_per_caller");
    keep!(quotas.chat, "quotas.chat");
    keep!(quotas.user, "quotas.user");
    keep!(quotas.message, "quotas.message");
    keep!(quotas.card, "quotas.card");
    keep!(
        quotas.final_headroom_percent,
        "quotas.final_headroom_percent"
    );
    keep!(quotas.safety_margin, "quotas.safety_margin_ms");
    keep!(embedded_fake, "--embedded-fake");
    LinedUp {
        config: new,
        needs_restart,
        removed_apps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text).unwrap()
    }

    const BASE: &str = r#"
        [apps.a]
        app_id = "cli_a"
        app_secret = "sa"
        [apps.b]
        app_id = "cli_b"
        app_secret = "sb"
        [callers.x]
        token_sha256 = "0000000000000000000000000000000000000000000000000000000000000001"
        apps = ["*"]
        [callers.y]
        token_sha256 = "0000000000000000000000000000000000000000000000000000000000000002"
        apps = ["a"]
    "#;

    #[test]
    fn apps_and_callers_keep_their_slots_removed_ones_leave_tombstones() {
        let old = config(BASE);
        // b and x go, c and w come, a's secret rotates.
        let new = config(
            r#"
            [apps.c]
            app_id = "cli_c"
            app_secret = "sc"
            [apps.a]
            app_id = "cli_a"
            app_secret = "sa2"
            [callers.w]
            token_sha256 = "0000000000000000000000000000000000000000000000000000000000000003"
            apps = ["*"]
            [callers.y]
            token_sha256 = "0000000000000000000000000000000000000000000000000000000000000002"
            apps = ["a", "c"]
        "#,
        );
        let l = line_up(&old, new);
        let names: Vec<_> = l
            .config
            .apps
            .iter()
            .map(|a| (a.name.as_str(), a.removed))
            .collect();
        assert_eq!(names, [("a", false), ("b", true), ("c", false)]);
        assert_eq!(l.config.apps[0].app_secret, "sa2");
        assert_eq!(l.removed_apps, [1]);
        let callers: Vec<_> = l
            .config
            .auth
            .callers
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(callers, ["x", "y", "w"]);
        let x = &l.config.auth.callers[0];
        assert!(x.token_sha256.is_none() && x.apps == AppGrant::Only(vec![]));
        assert_eq!(
            l.config.auth.callers[1].apps,
            AppGrant::Only(vec!["a".into(), "c".into()])
        );
        assert!(l.needs_restart.is_empty(), "{:?}", l.needs_restart);
        // Lined up again (b still gone): b is not removed twice; re-added, it takes its slot.
        let again = line_up(&l.config, config(BASE));
        assert_eq!(again.removed_apps, [2]);
        assert!(!again.config.apps[1].removed);
        assert_eq!(again.config.apps[1].name, "b");
    }

    #[test]
    fn a_name_moved_to_another_app_id_is_another_app() {
        let old = config(BASE);
        let new = config(&BASE.replace("cli_b", "cli_b2"));
        let l = line_up(&old, new);
        let apps: Vec<_> = l
            .config
            .apps
            .iter()
            .map(|a| (a.name.as_str(), a.app_id.as_str(), a.removed))
            .collect();
        assert_eq!(
            apps,
            [
                ("a", "cli_a", false),
                ("b", "cli_b", true),
                ("b", "cli_b2", false)
            ]
        );
        assert_eq!(l.removed_apps, [1]);
    }

    #[test]
    fn restart_only_settings_keep_their_running_values_and_are_named() {
        let old = config(BASE);
        let new = config(&format!(
            "{BASE}\n[queue]\nmax_total = 7\n[quotas]\nchat = {{ limit = 4, window_ms = 1000 }}\n\
             card = {{ limit = 8, window_ms = 1000 }}\nfinal_headroom_percent = 20\n\
             app = [{{ limit = 10, window_ms = 1000 }}]\n[streams]\ncard_streaming_limit_s = 300\n"
        ));
        let l = line_up(&old, new);
        assert_eq!(
            l.needs_restart,
            [
                "queue",
                "quotas.chat",
                "quotas.card",
                "quotas.final_headroom_percent"
            ]
        );
        // Streams renew their cards by the new limit (the door reads it).
        assert_eq!(
            l.config.card_streaming_limit,
            std::time::Duration::from_secs(300)
        );
        assert_eq!(l.config.queue, old.queue);
        assert_eq!(l.config.quotas.chat, old.quotas.chat);
        // The app quotas are live.
        assert_eq!(l.config.quotas.app.len(), 1);
        assert_ne!(l.config.quotas.app, old.quotas.app);
    }
}
