//! The portal's gate: signed out, every page sends to the login page and
//! back; signing in sets an HttpOnly, SameSite=Strict session cookie; a form
//! without its CSRF token is refused; every response carries the
//! Content-Security-Policy; signing out revokes the session.
#![allow(clippy::unwrap_used)]

mod common;

use common::Portal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_signs_in_checks_tokens_and_signs_out() {
    let p = Portal::start().await;
    let password = p.user("viewer", Some("Environment viewer")).await;

    // Signed out: to the login page, remembering where.
    let anon = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = anon
        .get(format!("{}/spaces/Default/", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(
        resp.headers()["location"],
        "/login?next=%2Fspaces%2FDefault%2F"
    );
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );

    // A wrong password: the form again, saying so; no session.
    let b = common::Browser {
        http: reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        base: p.base.clone(),
    };
    let form = b.get("/login").await;
    let token = form.input("token").unwrap();
    let wrong = b
        .post_form(
            "/login",
            &[
                ("username", "viewer"),
                ("password", "nope"),
                ("token", &token),
                ("next", "/"),
            ],
        )
        .await;
    assert_eq!(wrong.status, 401);
    assert!(
        wrong.body.contains("wrong username or password"),
        "{}",
        wrong.body
    );
    // Without the form's token (another site's form): refused.
    let forged = b
        .post_form(
            "/login",
            &[
                ("username", "viewer"),
                ("password", &password),
                ("token", "x"),
            ],
        )
        .await;
    assert_eq!(forged.status, 403);

    // Signed in: the cookie's attributes, then the page.
    let form = b.get("/login?next=%2Fspaces%2FDefault%2F").await;
    let token = form.input("token").unwrap();
    let resp = b
        .http
        .post(format!("{}/login", p.base))
        .form(&[
            ("username", "viewer"),
            ("password", password.as_str()),
            ("token", token.as_str()),
            ("next", "/spaces/Default/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/spaces/Default/");
    let cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("octopus_session="))
        .unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let home = b.get("/spaces/Default/").await;
    assert_eq!(home.status, 200);
    assert!(home.body.contains("Dashboard"));

    // A form without the CSRF token is refused, with it accepted; with it but
    // marked by the browser as sent from another site, refused too.
    let out = b.post_form("/logout", &[]).await;
    assert_eq!(out.status, 403, "{}", out.body);
    let token = b.get("/spaces/Default/").await.csrf();
    let cross = b
        .http
        .post(format!("{}/logout", p.base))
        .header("sec-fetch-site", "cross-site")
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    assert!(cross.text().await.unwrap().contains("another site"));
    let out = b.submit("/spaces/Default/", "/logout", &[]).await;
    assert_eq!(out.status, 303);
    assert_eq!(out.location.as_deref(), Some("/login"));
    // The session is gone.
    let after = b.get("/spaces/Default/").await;
    assert_eq!(after.status, 303);
}
