//! The administration pages over HTTP, on a real server: spaces, users,
//! teams, roles, API keys and the audit log. Each form is fetched (for its
//! CSRF token), posted, and its 303 followed to see the result; refusals (the
//! gate's, or the API's own service functions') show on the page with their
//! status; names are escaped. Every wait is bounded (`common::T`).
#![allow(clippy::unwrap_used)]

mod common;

use common::{Browser, Page, Portal, T};
use serde_json::json;

/// An administrator with a password (the first one has only an API key).
async fn admin(p: &Portal, name: &str) -> Browser {
    let password = format!("{name}-password-1");
    let (s, b) = p
        .api(
            "POST",
            "/api/users",
            Some(json!({ "username": name, "password": password, "is_admin": true })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    p.browser(name, &password).await
}

/// Follows a form's 303 and returns the page it leads to.
async fn follow(b: &Browser, resp: Page) -> Page {
    assert_eq!(resp.status, 303, "{}", resp.body);
    let to = resp.location.unwrap();
    assert!(to.starts_with('/'), "{to}");
    let page = b.get(&to).await;
    assert_eq!(page.status, 200, "{to}: {}", page.body);
    page
}

/// The text of the page's alert (a refusal), if any.
fn alert(page: &Page) -> Option<&str> {
    let start = page.body.find("role=\"alert\"")?;
    let start = page.body[start..].find('>')? + start + 1;
    let end = page.body[start..].find("</p>")? + start;
    Some(&page.body[start..end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_runs_spaces_users_teams_and_roles_from_the_pages() {
    let p = Portal::start().await;
    let b = admin(&p, "root").await;

    // Spaces: the form, a new space, its link.
    let page = b.get("/spaces").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("action=\"/spaces\""), "{}", page.body);
    let done = b
        .submit(
            "/spaces",
            "/spaces",
            &[("name", "Ops"), ("description", "Operations")],
        )
        .await;
    let page = follow(&b, done).await;
    assert!(page.body.contains("href=\"/spaces/Ops/\""), "{}", page.body);
    assert!(page.body.contains("Operations"));
    // A duplicate is refused on the page, with the API's status.
    let dup = b.submit("/spaces", "/spaces", &[("name", "Ops")]).await;
    assert_eq!(dup.status, 409, "{}", dup.body);
    assert!(alert(&dup).is_some(), "{}", dup.body);
    // A space holding a machine is not deleted: the API's reason shows.
    let (s, e) = p
        .api(
            "POST",
            "/api/spaces/Ops/environments",
            Some(json!({ "name": "Test" })),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let (s, m) = p
        .api(
            "POST",
            "/api/spaces/Ops/machines",
            Some(json!({
                "name": "web-1",
                "comms_style": "TentaclePassive",
                "uri": "https://127.0.0.1:9/",
                "thumbprint": "AB".repeat(32),
                "environments": ["Test"],
            })),
        )
        .await;
    assert_eq!(s, 201, "{m}");
    let refused = b.submit("/spaces", "/spaces/Ops/delete", &[]).await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        alert(&refused).is_some_and(|a| a.contains("machine")),
        "{}",
        refused.body
    );
    // An empty one is.
    let done = b.submit("/spaces", "/spaces", &[("name", "Scratch")]).await;
    follow(&b, done).await;
    let done = b.submit("/spaces", "/spaces/Scratch/delete", &[]).await;
    let page = follow(&b, done).await;
    assert!(!page.body.contains("Scratch"), "{}", page.body);

    // Users: the form, a new user, their page.
    let page = b.get("/users").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("id=\"new-is-admin\""), "{}", page.body);
    let mismatch = b
        .submit(
            "/users",
            "/users",
            &[
                ("username", "alice"),
                ("password", "alice-password-1"),
                ("confirm", "something-else"),
            ],
        )
        .await;
    assert_eq!(mismatch.status, 400);
    assert!(alert(&mismatch).is_some_and(|a| a.contains("differ")));
    let done = b
        .submit(
            "/users",
            "/users",
            &[
                ("username", "alice"),
                ("display_name", "Alice Archer"),
                ("password", "alice-password-1"),
                ("confirm", "alice-password-1"),
            ],
        )
        .await;
    assert_eq!(done.location.as_deref(), Some("/users/alice?done=created"));
    let page = follow(&b, done).await;
    assert!(page.body.contains("Alice Archer"), "{}", page.body);
    assert!(page.body.contains("The user was created."));
    let list = b.get("/users").await;
    assert!(list.body.contains("href=\"/users/alice\""), "{}", list.body);
    // Alice can sign in with the password given.
    let alice = p.browser("alice", "alice-password-1").await;
    // Her own page lets her change her password (with the current one).
    let own = alice.get("/users/alice").await;
    assert_eq!(own.status, 200);
    assert!(own.body.contains("id=\"current-password\""), "{}", own.body);
    let wrong = alice
        .submit(
            "/users/alice",
            "/users/alice/password",
            &[
                ("current_password", "not-it-at-all"),
                ("password", "alice-password-2"),
                ("confirm", "alice-password-2"),
            ],
        )
        .await;
    assert_eq!(wrong.status, 400, "{}", wrong.body);
    let done = alice
        .submit(
            "/users/alice",
            "/users/alice/password",
            &[
                ("current_password", "alice-password-1"),
                ("password", "alice-password-2"),
                ("confirm", "alice-password-2"),
            ],
        )
        .await;
    let page = follow(&alice, done).await;
    assert!(page.body.contains("The password was changed."));
    p.browser("alice", "alice-password-2").await;
    // Disabled and enabled again by the administrator.
    let done = b.submit("/users/alice", "/users/alice/disable", &[]).await;
    let page = follow(&b, done).await;
    assert!(page.body.contains("id=\"enable-user\""), "{}", page.body);
    let (_, u) = p.api("GET", "/api/users/alice", None).await;
    assert_eq!(u["disabled"], true);
    let done = b.submit("/users/alice", "/users/alice/enable", &[]).await;
    follow(&b, done).await;

    // Roles: a custom one from checkboxes; an empty selection refused.
    let page = b.get("/roles").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Environment viewer"));
    assert!(page.body.contains("id=\"perm-EventView\""));
    let empty = b.submit("/roles", "/roles", &[("name", "Nothing")]).await;
    assert_eq!(empty.status, 400, "{}", empty.body);
    assert!(alert(&empty).is_some_and(|a| a.contains("at least one permission")));
    assert!(empty.body.contains("value=\"Nothing\""), "the form is kept");
    let done = b
        .submit(
            "/roles",
            "/roles",
            &[
                ("name", "Auditor"),
                ("description", "Reads the audit log"),
                ("permission", "EventView"),
                ("permission", "TeamView"),
            ],
        )
        .await;
    let page = follow(&b, done).await;
    assert!(page.body.contains("Auditor"), "{}", page.body);
    let (_, role) = p.api("GET", "/api/roles/Auditor", None).await;
    assert_eq!(role["permissions"], json!(["TeamView", "EventView"]));

    // Teams: a team, a member, grants (a built-in role narrowed to an
    // environment, the custom role), then taken apart again.
    let (s, e) = p
        .api("POST", "/api/environments", Some(json!({ "name": "Test" })))
        .await;
    assert_eq!(s, 201, "{e}");
    let page = b.get("/spaces/Default/teams").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("id=\"team-system\""), "{}", page.body);
    let done = b
        .submit(
            "/spaces/Default/teams",
            "/spaces/Default/teams",
            &[("name", "Deployers"), ("description", "Ship it")],
        )
        .await;
    assert_eq!(
        done.location.as_deref(),
        Some("/spaces/Default/teams/Deployers")
    );
    let page = follow(&b, done).await;
    assert!(
        page.body.contains("<option value=\"alice\">alice</option>"),
        "users to add are offered: {}",
        page.body
    );
    assert!(page.body.contains("<option value=\"Test\">Test</option>"));
    assert!(page.body.contains("Auditor (custom)"));
    let team = "/spaces/Default/teams/Deployers";
    let done = b
        .submit(team, &format!("{team}/members"), &[("username", "alice")])
        .await;
    follow(&b, done).await;
    let done = b
        .submit(
            team,
            &format!("{team}/grants"),
            &[("role", "Project deployer"), ("environment", "Test")],
        )
        .await;
    follow(&b, done).await;
    let done = b
        .submit(team, &format!("{team}/grants"), &[("role", "Auditor")])
        .await;
    let page = follow(&b, done).await;
    assert!(
        page.body
            .contains("Project deployer in Default (environments Test)"),
        "{}",
        page.body
    );
    let (_, t) = p.api("GET", "/api/teams/Deployers", None).await;
    assert_eq!(t["members"], json!(["alice"]));
    assert_eq!(t["grants"].as_array().unwrap().len(), 2);
    // Alice now holds the custom role's EventView: the audit page opens.
    let alice = p.browser("alice", "alice-password-2").await;
    let audit = alice.get("/spaces/Default/audit").await;
    assert_eq!(audit.status, 200, "{}", audit.body);
    // The list shows the team with its members and roles.
    let list = b.get("/spaces/Default/teams").await;
    assert!(list
        .body
        .contains("href=\"/spaces/Default/teams/Deployers\""));
    assert!(list.body.contains("Auditor in Default"));
    // A role that does not exist: the API's refusal on the page.
    let bad = b
        .submit(team, &format!("{team}/grants"), &[("role", "Nobody")])
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(alert(&bad).is_some_and(|a| a.contains("is not a role")));
    // Revoke a grant, remove the member, delete the team.
    let id = t["grants"][0]["id"].as_i64().unwrap();
    let done = b
        .submit(team, &format!("{team}/grants/{id}/revoke"), &[])
        .await;
    follow(&b, done).await;
    let done = b
        .submit(team, &format!("{team}/members/alice/remove"), &[])
        .await;
    follow(&b, done).await;
    let (_, t) = p.api("GET", "/api/teams/Deployers", None).await;
    assert_eq!(t["members"], json!([]));
    assert_eq!(t["grants"].as_array().unwrap().len(), 1);
    let done = b.submit(team, &format!("{team}/delete"), &[]).await;
    assert_eq!(done.location.as_deref(), Some("/spaces/Default/teams"));
    let page = follow(&b, done).await;
    assert!(!page.body.contains("Deployers"), "{}", page.body);

    // The audit log: the changes above, newest first, filtered and paged.
    let page = b.get("/spaces/Default/audit").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Deployers"), "{}", page.body);
    assert!(
        page.body.contains("outside any space"),
        "an administrator sees the changes outside any space too"
    );
    let deleted = page.body.find("<td>deleted</td>").unwrap();
    let created = page.body.find("<td>created</td>").unwrap();
    assert!(deleted < created, "newest first");
    let mine = b.get("/spaces/Default/audit?user=alice&within=day").await;
    assert_eq!(mine.status, 200);
    assert!(mine.body.contains("password"), "{}", mine.body);
    assert!(!mine.body.contains("Deployers"), "only alice's changes");
    let paged = b.get("/spaces/Default/audit?take=2").await;
    assert!(paged.body.contains("rel=\"next\""), "{}", paged.body);
    assert!(paged.body.contains("Changes 1 to 2"));
    let second = b.get("/spaces/Default/audit?take=2&skip=2").await;
    assert!(second.body.contains("Changes 3 to 4"), "{}", second.body);
    assert!(second.body.contains("rel=\"prev\""));
    let bad = b.get("/spaces/Default/audit?since=yesterday").await;
    assert_eq!(bad.status, 400);
    assert!(alert(&bad).is_some());
    let future = b
        .get("/spaces/Default/audit?since=2999-01-01T00%3A00")
        .await;
    assert!(future.body.contains("No change matches."));
}

/// The value of the new key's input.
fn new_key(body: &str) -> Option<String> {
    let at = body.find("id=\"new-key\"")?;
    let needle = "value=\"";
    let start = body[at..].find(needle)? + at + needle.len();
    let end = body[start..].find('"')? + start;
    Some(body[start..end].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_shown_once_and_works() {
    let p = Portal::start().await;
    let password = p.user("bob", Some("Environment viewer")).await;
    let b = p.browser("bob", &password).await;

    let page = b.get("/api-keys").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("This session"), "{}", page.body);
    assert!(!page.body.contains("Everyone else"), "{}", page.body);
    // Created: the answer itself shows the key, not to be cached.
    let resp = b
        .http
        .post(format!("{}/api-keys", p.base))
        .form(&[("purpose", "deploy from CI"), ("csrf", &page.csrf())])
        .timeout(T)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body = resp.text().await.unwrap();
    let key = new_key(&body).unwrap();
    assert!(key.starts_with("API-"), "{key}");
    assert!(body.contains("data-copy=\"#new-key\""));
    // It works against the API.
    let http = reqwest::Client::new();
    let me = http
        .get(format!("{}/api/users/me", p.base))
        .header("X-Octopus-ApiKey", &key)
        .timeout(T)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    let me: serde_json::Value = me.json().await.unwrap();
    assert_eq!(me["user"]["username"], "bob");
    // Never shown again.
    let again = b.get("/api-keys").await;
    assert!(!again.body.contains(&key), "the key is shown once only");
    assert!(again.body.contains("deploy from CI"));
    // Revoked from the page: it stops working.
    let (_, keys) = p.api("GET", "/api/api-keys", None).await;
    let id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["purpose"] == "deploy from CI")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let done = b
        .submit("/api-keys", &format!("/api-keys/{id}/revoke"), &[])
        .await;
    let page = follow(&b, done).await;
    assert!(page.body.contains("Revoked"), "{}", page.body);
    let gone = http
        .get(format!("{}/api/users/me", p.base))
        .header("X-Octopus-ApiKey", &key)
        .timeout(T)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 401);
    // Another's key (the first administrator's) is not there for bob.
    let admins = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["user_id"] != me["user"]["id"])
        .map(|k| k["id"].as_i64().unwrap())
        .unwrap();
    let other = b
        .submit("/api-keys", &format!("/api-keys/{admins}/revoke"), &[])
        .await;
    assert_eq!(other.status, 404, "{}", other.body);
    let (s, _) = p.api("GET", "/api/users/me", None).await;
    assert_eq!(s, 200, "the administrator's key still works");
    // An administrator sees everyone's keys with their owners.
    let root = admin(&p, "root").await;
    let page = root.get("/api-keys").await;
    assert!(page.body.contains("Everyone else"), "{}", page.body);
    assert!(page.body.contains("<td>bob</td>"), "{}", page.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_forms_and_crafted_posts_are_refused() {
    let p = Portal::start().await;
    let password = p.user("viewer", Some("Environment viewer")).await;
    let b = p.browser("viewer", &password).await;

    let spaces = b.get("/spaces").await;
    assert_eq!(spaces.status, 200);
    assert!(spaces.body.contains("href=\"/spaces/Default/\""));
    assert!(
        !spaces.body.contains("action=\"/spaces\""),
        "{}",
        spaces.body
    );
    assert!(!spaces.body.contains("/delete"), "{}", spaces.body);
    for page in ["/users", "/roles", "/spaces/Default/audit"] {
        let got = b.get(page).await;
        assert_eq!(got.status, 403, "{page}: {}", got.body);
    }
    let teams = b.get("/spaces/Default/teams").await;
    assert_eq!(teams.status, 200);
    assert!(teams.body.contains("viewer-team"));
    assert!(!teams
        .body
        .contains("<form method=\"post\" action=\"/spaces/Default/teams\""));
    let team = b.get("/spaces/Default/teams/viewer-team").await;
    assert_eq!(team.status, 200);
    assert!(!team.body.contains("/members\""), "{}", team.body);
    assert!(!team.body.contains("/grants\""), "{}", team.body);
    assert!(!team.body.contains("/delete\""), "{}", team.body);
    // Their own user page: the password form, nothing else.
    let own = b.get("/users/viewer").await;
    assert_eq!(own.status, 200);
    assert!(!own.body.contains("/disable\""));
    assert!(own.body.contains("/users/viewer/password"));
    // Another's is not theirs to see.
    let other = b.get("/users/admin").await;
    assert_eq!(other.status, 403);

    // Crafted posts, with a valid token: refused by the gate or by the API's
    // service function, and nothing changes.
    let crafted: [(&str, &[(&str, &str)]); 9] = [
        ("/spaces", &[("name", "Mine")]),
        ("/spaces/Default/delete", &[]),
        (
            "/users",
            &[
                ("username", "mallory"),
                ("password", "mallory-pw-1"),
                ("confirm", "mallory-pw-1"),
            ],
        ),
        ("/users/admin/disable", &[]),
        (
            "/users/admin/password",
            &[("password", "taken-over-1"), ("confirm", "taken-over-1")],
        ),
        (
            "/roles",
            &[("name", "Mine"), ("permission", "AdministerSystem")],
        ),
        (
            "/spaces/Default/teams",
            &[("name", "Mine"), ("system", "on")],
        ),
        (
            "/spaces/Default/teams/viewer-team/members",
            &[("username", "admin")],
        ),
        (
            "/spaces/Default/teams/viewer-team/grants",
            &[("role", "System administrator"), ("all_spaces", "on")],
        ),
    ];
    for (action, fields) in crafted {
        let got = b.submit("/spaces", action, fields).await;
        assert_eq!(got.status, 403, "{action}: {}", got.body);
    }
    let (_, spaces) = p.api("GET", "/api/spaces", None).await;
    assert_eq!(spaces.as_array().unwrap().len(), 1);
    let (_, users) = p.api("GET", "/api/users", None).await;
    assert_eq!(users.as_array().unwrap().len(), 2);
    let (_, t) = p.api("GET", "/api/teams/viewer-team", None).await;
    assert_eq!(t["members"], json!(["viewer"]));
    assert_eq!(t["grants"].as_array().unwrap().len(), 1);
    let (_, roles) = p.api("GET", "/api/roles", None).await;
    assert!(roles
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["name"] != "Mine"));

    // A form without its token is refused before anything runs.
    let forged = b.post_form("/api-keys", &[("purpose", "x")]).await;
    assert_eq!(forged.status, 403, "{}", forged.body);
    let forged = b
        .post_form(
            "/users/viewer/password",
            &[("password", "whatever-1"), ("confirm", "whatever-1")],
        )
        .await;
    assert_eq!(forged.status, 403);
    let (_, keys) = p.api("GET", "/api/api-keys", None).await;
    assert!(keys.as_array().unwrap().iter().all(|k| k["purpose"] != "x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_administrator_stays_and_names_are_escaped() {
    const EVIL: &str = "<img src=x onerror=alert(1)>";
    // Escaped: askama writes numeric entities (`&#60;`), `&lt;` would do too.
    let escaped = |body: &str| {
        body.contains("&#60;img src=x onerror=alert(1)&#62;")
            || body.contains("&lt;img src=x onerror=alert(1)&gt;")
    };
    let p = Portal::start().await;
    let b = admin(&p, "root").await;

    // A user and a team with a hostile name: shown escaped, never raw.
    let done = b
        .submit(
            "/users",
            "/users",
            &[
                ("username", EVIL),
                ("display_name", EVIL),
                ("password", "evil-password-1"),
                ("confirm", "evil-password-1"),
            ],
        )
        .await;
    let page = follow(&b, done).await;
    assert!(escaped(&page.body), "{}", page.body);
    assert!(!page.body.contains(EVIL));
    let list = b.get("/users").await;
    assert!(escaped(&list.body) && !list.body.contains(EVIL));
    let done = b
        .submit(
            "/spaces/Default/teams",
            "/spaces/Default/teams",
            &[("name", EVIL), ("description", EVIL)],
        )
        .await;
    let team = done.location.clone().unwrap();
    assert!(team.starts_with("/spaces/Default/teams/%3Cimg"), "{team}");
    let page = follow(&b, done).await;
    assert!(escaped(&page.body), "{}", page.body);
    assert!(!page.body.contains(EVIL), "{}", page.body);
    let done = b
        .submit(&team, &format!("{team}/members"), &[("username", EVIL)])
        .await;
    let page = follow(&b, done).await;
    assert!(!page.body.contains(EVIL));
    for path in [
        "/spaces/Default/teams",
        "/spaces/Default/audit",
        "/api-keys",
    ] {
        let got = b.get(path).await;
        assert_eq!(got.status, 200, "{path}");
        assert!(!got.body.contains(EVIL), "{path}: {}", got.body);
    }
    let audit = b.get("/spaces/Default/audit").await;
    assert!(escaped(&audit.body));

    // The last administrator: root disables the first one, then cannot
    // disable themselves, nor leave the administrators' team.
    let done = b.submit("/users", "/users/admin/disable", &[]).await;
    follow(&b, done).await;
    let refused = b.submit("/users", "/users/root/disable", &[]).await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        alert(&refused).is_some_and(|a| a.contains("last enabled System administrator")),
        "{}",
        refused.body
    );
    let admins = "/spaces/Default/teams/Octopus%20Administrators";
    let page = b.get(admins).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let refused = b
        .submit(admins, &format!("{admins}/members/root/remove"), &[])
        .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(alert(&refused).is_some_and(|a| a.contains("last enabled System administrator")));
    // Root is still an administrator.
    let users = b.get("/users").await;
    assert_eq!(users.status, 200);
}
