//! user-service: registration, login (argon2 password hashes, EdDSA-signed JWTs), profiles, and
//! the JWKS the gateway verifies tokens with.
//!
//! The signing key lives in the shared database, so every replica signs with the same key and
//! publishes the same JWKS: the first replica to start creates it.

use crate::common::{new_id, now_rfc3339, ApiError, ApiJson, ApiResult, Identity};
use crate::db::{self, Db};
use anyhow::Context;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS users (
        id TEXT PRIMARY KEY,
        email TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        first_name TEXT NOT NULL,
        last_name TEXT NOT NULL,
        role TEXT NOT NULL,
        created_at TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS signing_keys (
        id BIGINT PRIMARY KEY,
        pkcs8 TEXT NOT NULL,
        created_at TEXT NOT NULL)",
];

/// Token settings, from the command line or the environment.
#[derive(Clone, Debug, clap::Args)]
pub struct TokenSettings {
    /// `iss` of the tokens issued.
    #[arg(long, env = "JWT_ISSUER", default_value = "user-service")]
    pub issuer: String,
    /// `aud` of the tokens issued.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "api")]
    pub audience: String,
    /// Token lifetime in seconds.
    #[arg(long, env = "JWT_TTL_SECONDS", default_value_t = 3600)]
    pub ttl_seconds: u64,
    /// E-mail addresses whose accounts get the `admin` role when they register (comma-separated):
    /// how the first administrator is made.
    #[arg(long, env = "ADMIN_EMAILS", value_delimiter = ',', default_value = "")]
    pub admin_emails: Vec<String>,
}

struct UserService {
    db: Db,
    settings: TokenSettings,
    key: EncodingKey,
    kid: String,
    jwks: Value,
    /// A hash of a random password, checked when the email is unknown so that a login costs
    /// the same whether or not the account exists.
    dummy_hash: String,
}

/// The user service's routes, on `db`.
pub async fn router(db: Db, settings: TokenSettings) -> anyhow::Result<Router> {
    let pkcs8 = signing_key(&db).await?;
    let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
        .map_err(|e| anyhow::anyhow!("stored signing key is not Ed25519 PKCS#8: {e}"))?;
    let public = pair.public_key().as_ref();
    // The key id is derived from the public key, so all replicas agree on it.
    let kid =
        URL_SAFE_NO_PAD.encode(&ring::digest::digest(&ring::digest::SHA256, public).as_ref()[..12]);
    let jwks = json!({ "keys": [{
        "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
        "kid": kid, "x": URL_SAFE_NO_PAD.encode(public),
    }]});
    let state = Arc::new(UserService {
        db,
        settings,
        key: EncodingKey::from_ed_der(&pkcs8),
        kid,
        jwks,
        dummy_hash: hash_password(new_id())
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?,
    });
    Ok(Router::new()
        .route("/api/users/register", post(register))
        .route("/api/users/login", post(login))
        .route("/api/users/{id}", get(profile))
        .route("/.well-known/jwks.json", get(publish_jwks))
        .with_state(state))
}

/// Opens the user database.
pub async fn open_db(url: &str) -> anyhow::Result<Db> {
    db::open(url, SCHEMA).await
}

/// The shared signing key (PKCS#8 DER), created by whichever replica gets there first.
async fn signing_key(db: &Db) -> anyhow::Result<Vec<u8>> {
    let fresh = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("generating a signing key"))?;
    sqlx::query(
        "INSERT INTO signing_keys (id, pkcs8, created_at) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING",
    )
    .bind(STANDARD.encode(fresh.as_ref()))
    .bind(now_rfc3339())
    .execute(db)
    .await
    .context("storing the signing key")?;
    let (stored,): (String,) = sqlx::query_as("SELECT pkcs8 FROM signing_keys WHERE id = 1")
        .fetch_one(db)
        .await
        .context("reading the signing key")?;
    STANDARD
        .decode(stored)
        .context("stored signing key is not base64")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Registration {
    email: String,
    password: String,
    first_name: String,
    last_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    email: String,
    password: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    role: &'a str,
    iat: u64,
    exp: u64,
}

fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    email.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn validate(r: &Registration) -> Result<(), ApiError> {
    if !valid_email(&r.email) {
        return Err(ApiError::bad_request("email: not a valid address"));
    }
    if r.password.chars().count() < 8 || r.password.len() > 128 {
        return Err(ApiError::bad_request(
            "password: 8 to 128 characters required",
        ));
    }
    for (field, value) in [("firstName", &r.first_name), ("lastName", &r.last_name)] {
        let trimmed = value.trim();
        if trimmed.is_empty() || trimmed.chars().count() > 100 {
            return Err(ApiError::bad_request(format!(
                "{field}: 1 to 100 characters required"
            )));
        }
    }
    Ok(())
}

impl UserService {
    fn token(&self, user_id: &str, role: &str) -> ApiResult<(String, u64)> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            iss: &self.settings.issuer,
            aud: &self.settings.audience,
            sub: user_id,
            role,
            iat: now,
            exp: now + self.settings.ttl_seconds,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| anyhow::anyhow!("signing a token: {e}"))?;
        Ok((token, self.settings.ttl_seconds))
    }
}

/// Argon2id hashing is deliberately slow: it runs off the async workers.
async fn hash_password(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || {
        let mut salt = [0u8; 16];
        SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| anyhow::anyhow!("no randomness for a salt"))?;
        let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("hashing: {e}"))?;
        Ok::<_, anyhow::Error>(hash.to_string())
    })
    .await
    .map_err(|e| anyhow::anyhow!("hashing task: {e}"))?
    .map_err(ApiError::from)
}

async fn verify_password(password: String, stored: String) -> ApiResult<bool> {
    let ok = tokio::task::spawn_blocking(move || match PasswordHash::new(&stored) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    })
    .await
    .map_err(|e| anyhow::anyhow!("verifying task: {e}"))?;
    Ok(ok)
}

async fn register(
    State(s): State<Arc<UserService>>,
    ApiJson(r): ApiJson<Registration>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    validate(&r)?;
    let email = r.email.trim().to_lowercase();
    let role = match s
        .settings
        .admin_emails
        .iter()
        .any(|a| a.trim().eq_ignore_ascii_case(&email))
    {
        true => "admin",
        false => "user",
    };
    let hash = hash_password(r.password).await?;
    let id = new_id();
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, password_hash, first_name, last_name, role, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(&email)
    .bind(&hash)
    .bind(r.first_name.trim())
    .bind(r.last_name.trim())
    .bind(role)
    .bind(now_rfc3339())
    .execute(&s.db)
    .await;
    match inserted {
        Ok(_) => {}
        Err(e) if db::is_unique_violation(&e) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "email already registered",
            ))
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(user_id = %id, role, "user registered");
    let (token, expires_in) = s.token(&id, role)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "userId": id, "email": email, "role": role, "token": token, "expiresIn": expires_in,
        })),
    ))
}

async fn login(
    State(s): State<Arc<UserService>>,
    ApiJson(l): ApiJson<Login>,
) -> ApiResult<Json<Value>> {
    let email = l.email.trim().to_lowercase();
    if email.len() > 254 || l.password.len() > 128 {
        return Err(ApiError::bad_request("email or password too long"));
    }
    let row: Option<(String, String, String)> =
        sqlx::query_as("SELECT id, password_hash, role FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(&s.db)
            .await?;
    // Unknown users cost a hash check too, so timing does not tell which emails exist.
    let (id, hash, role) =
        row.unwrap_or_else(|| (String::new(), s.dummy_hash.clone(), String::new()));
    let ok = verify_password(l.password, hash).await?;
    if !ok || id.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid email or password",
        ));
    }
    let (token, expires_in) = s.token(&id, &role)?;
    Ok(Json(
        json!({ "userId": id, "token": token, "expiresIn": expires_in }),
    ))
}

async fn profile(
    State(s): State<Arc<UserService>>,
    who: Identity,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    if !who.may_access(&id) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "not your profile"));
    }
    let row: Option<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT id, email, first_name, last_name, created_at FROM users WHERE id = $1",
    )
    .bind(&id)
    .fetch_optional(&s.db)
    .await?;
    let Some((id, email, first, last, created)) = row else {
        return Err(ApiError::not_found("no such user"));
    };
    Ok(Json(json!({
        "userId": id, "email": email, "firstName": first, "lastName": last, "createdAt": created,
    })))
}

async fn publish_jwks(State(s): State<Arc<UserService>>) -> Json<Value> {
    Json(s.jwks.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert!(valid_email("ada@example.com"));
        assert!(!valid_email("ada"));
        assert!(!valid_email("@example.com"));
        assert!(!valid_email("ada@localhost"));
        assert!(!valid_email("a da@example.com"));
    }
}
