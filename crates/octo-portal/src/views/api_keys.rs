//! API keys: the caller's keys and sessions (and, with `ApiKeyEdit`,
//! everyone's, with their owners), a form to create one and revoke buttons.
//! A new key is shown once, in the answer to the form itself (not after a
//! redirect; never stored; the answer is `Cache-Control: no-store` as every
//! page is). The changes are the API's own service functions
//! (`octo_server_core::api::api_keys`).

use std::collections::HashMap;

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Form;
use octo_api_types::{ApiKey, NewApiKey, Permission};
use octo_server_core::api::api_keys::{keys_of, new_api_key, revoke_key};
use octo_server_core::api::users::all_users;
use octo_server_core::api::ApiError;
use octo_server_core::authz::Access;
use octo_server_core::AppState;
use serde::Deserialize;

use super::users::{shown, unreadable};
use super::{api_error, render, see_other, when, Frame};
use crate::gate::{get, post, Page};

pub(crate) fn pages() -> Vec<Page> {
    vec![
        get("/api-keys", Access::Authenticated, list),
        post("/api-keys", Access::Authenticated, create),
        post("/api-keys/{id}/revoke", Access::Authenticated, revoke),
    ]
}

struct KeyRow {
    id: i64,
    prefix: String,
    purpose: String,
    owner: String,
    created: String,
    last_used: String,
    session: bool,
    revoked: bool,
    /// The session this page is shown in (sign out instead of revoking it).
    current: bool,
    revoke: String,
}

/// A key just created: shown this once.
struct Created {
    key: String,
    prefix: String,
    purpose: String,
}

#[derive(Template)]
#[template(path = "api_keys.html")]
struct KeysPage {
    f: Frame,
    mine: Vec<KeyRow>,
    others: Vec<KeyRow>,
    see_others: bool,
    created: Option<Created>,
    purpose: String,
    error: Option<String>,
}

async fn list_page(
    s: &AppState,
    f: Frame,
    created: Option<Created>,
    purpose: String,
    error: Option<&ApiError>,
) -> Response {
    let f = f.titled("API keys", "keys");
    let keys = match keys_of(s, &f.caller, false).await {
        Ok(k) => k,
        Err(e) => return api_error(&e),
    };
    let g = &f.caller.grants;
    let see_others = g.has_system(Permission::ApiKeyEdit);
    // Owners by name for those who may see users; by number otherwise.
    let mut names: HashMap<i64, String> = HashMap::new();
    if see_others && g.has_system(Permission::UserView) {
        if let Ok(users) = all_users(s, &f.caller).await {
            names = users.into_iter().map(|u| (u.id, u.username)).collect();
        }
    }
    let me = f.caller.user.id;
    let current = f.caller.key.id;
    let row = |k: ApiKey| KeyRow {
        owner: if k.user_id == me {
            f.caller.user.username.clone()
        } else {
            names
                .get(&k.user_id)
                .cloned()
                .unwrap_or_else(|| format!("user #{}", k.user_id))
        },
        revoke: format!("/api-keys/{}/revoke", k.id),
        current: k.id == current,
        id: k.id,
        prefix: k.prefix,
        purpose: k.purpose,
        created: when(Some(k.created_at)),
        last_used: when(k.last_used_at),
        session: k.session,
        revoked: k.revoked,
    };
    let (mut mine, mut others) = (Vec::new(), Vec::new());
    for k in keys {
        if k.user_id == me {
            mine.push(row(k));
        } else {
            others.push(row(k));
        }
    }
    // Working keys first, newest first.
    for list in [&mut mine, &mut others] {
        list.sort_by(|a, b| a.revoked.cmp(&b.revoked).then(b.id.cmp(&a.id)));
    }
    let page = KeysPage {
        mine,
        others,
        see_others,
        created,
        purpose,
        error: error.map(|e| e.message.clone()),
        f,
    };
    shown(render(&page), error)
}

async fn list(State(s): State<AppState>, f: Frame) -> Response {
    list_page(&s, f, None, String::new(), None).await
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct NewKeyForm {
    #[serde(default)]
    purpose: String,
}

/// Creates a key and shows it, this once, in this answer.
async fn create(
    State(s): State<AppState>,
    f: Frame,
    form: Result<Form<NewKeyForm>, FormRejection>,
) -> Response {
    let Form(form) = match form {
        Ok(v) => v,
        Err(r) => return unreadable(&r),
    };
    let purpose = form.purpose.trim().to_string();
    match new_api_key(&s, &f.caller, NewApiKey { purpose }).await {
        Ok(c) => {
            let created = Created {
                key: c.api_key,
                prefix: c.key.prefix,
                purpose: c.key.purpose,
            };
            list_page(&s, f, Some(created), String::new(), None).await
        }
        Err(e) => list_page(&s, f, None, form.purpose, Some(&e)).await,
    }
}

async fn revoke(State(s): State<AppState>, f: Frame, Path(id): Path<String>) -> Response {
    let result = match id.parse::<i64>() {
        Ok(id) => revoke_key(&s, &f.caller, id).await.map(drop),
        Err(_) => Err(ApiError::not_found(format!("API key #{id} does not exist"))),
    };
    match result {
        Ok(()) => see_other("/api-keys"),
        Err(e) => list_page(&s, f, None, String::new(), Some(&e)).await,
    }
}
