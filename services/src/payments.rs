//! payment-service: charges keyed by `Idempotency-Key`, so a retried request (by the client,
//! or by anything between it and a replica) is charged once.
//!
//! Keys are each caller's own (two users may both send `order-1`, as two Stripe accounts may).
//! The first request with a key inserts the charge; the database's unique constraint makes
//! that the only insert whichever replica the retries reach. A repeat with the same key and
//! the same parameters gets the original payment back (`Idempotent-Replayed: true`); the same
//! key with different parameters is refused with 422, as Stripe does.
//!
//! A charge is for an order of the caller's, asked of the order service with the caller's
//! identity (someone else's order is not found), and must be for the order's total.

use crate::common::{new_id, now_rfc3339, ApiError, ApiJson, ApiResult, Identity};
use crate::db::{self, Db};
use crate::peers::Peers;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS payments (
        id TEXT PRIMARY KEY,
        idempotency_key TEXT NOT NULL,
        user_id TEXT NOT NULL,
        order_id TEXT NOT NULL,
        amount_cents BIGINT NOT NULL,
        currency TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (user_id, idempotency_key))",
    // Keys are each caller's own, as Stripe scopes them to an account: two users may both
    // send `order-1`. The constraint is in the table, so that a SQLite connection that read
    // the schema before another replica added an index still sees it; this index brings it
    // to a table made before keys were per caller.
    "CREATE UNIQUE INDEX IF NOT EXISTS payments_user_key ON payments (user_id, idempotency_key)",
];

/// Opens the payment database.
pub async fn open_db(url: &str) -> anyhow::Result<Db> {
    db::open(url, SCHEMA).await
}

/// The payment service's routes, on `db`, checking orders with the order service.
pub fn router(db: Db, peers: Peers) -> Router {
    Router::new()
        .route("/api/payments", post(charge))
        .route("/api/payments/{id}", get(one))
        .with_state(PaymentService { db, peers })
}

#[derive(Clone)]
struct PaymentService {
    db: Db,
    peers: Peers,
}

/// Tells the order service the order is paid, as the caller.
async fn mark_paid(peers: &Peers, who: &Identity, order_id: &str) -> Result<(), ApiError> {
    let url = format!("{}/internal/orders/{order_id}/paid", peers.orders);
    peers.put("order service", &url, &as_headers(who)).await
}

/// The caller's identity as the order service reads it.
fn as_headers(who: &Identity) -> [(&str, &str); 2] {
    [
        ("x-user-id", who.user_id.as_str()),
        ("x-user-role", who.role.as_str()),
    ]
}

/// The order a charge is for must be the caller's and the charge its total, in its currency.
async fn check_order(peers: &Peers, who: &Identity, c: &Charge) -> Result<(), ApiError> {
    let url = format!("{}/api/orders/{}", peers.orders, c.order_id);
    let Some(order) = peers.get("order service", &url, &as_headers(who)).await? else {
        return Err(ApiError::not_found("no such order"));
    };
    let total = order["totalCents"].as_i64();
    if total != Some(c.amount_cents) || order["currency"].as_str() != Some(c.currency.as_str()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "amountCents and currency must be the order's total: {} {}",
                total.unwrap_or_default(),
                order["currency"].as_str().unwrap_or("")
            ),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Charge {
    order_id: String,
    amount_cents: i64,
    #[serde(default = "default_currency")]
    currency: String,
}

fn default_currency() -> String {
    "EUR".into()
}

type PaymentRow = (String, String, String, String, i64, String, String, String);

const COLUMNS: &str =
    "id, idempotency_key, user_id, order_id, amount_cents, currency, status, created_at";

fn payment_json(row: &PaymentRow) -> Value {
    let (id, _key, user_id, order_id, amount_cents, currency, status, created_at) = row;
    json!({
        "paymentId": id, "userId": user_id, "orderId": order_id, "amountCents": amount_cents,
        "currency": currency, "status": status, "createdAt": created_at,
    })
}

async fn charge(
    State(PaymentService { db, peers }): State<PaymentService>,
    who: Identity,
    headers: HeaderMap,
    ApiJson(c): ApiJson<Charge>,
) -> ApiResult<Response> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| ApiError::bad_request("Idempotency-Key header: 1 to 255 characters"))?
        .to_string();
    if c.order_id.is_empty() || c.order_id.len() > 64 {
        return Err(ApiError::bad_request("orderId: 1 to 64 characters"));
    }
    if !(1..=10_000_000_000).contains(&c.amount_cents) {
        return Err(ApiError::bad_request("amountCents: 1 to 10000000000"));
    }
    if c.currency.len() != 3 || !c.currency.chars().all(|ch| ch.is_ascii_uppercase()) {
        return Err(ApiError::bad_request("currency: a three-letter code"));
    }
    check_order(&peers, &who, &c).await?;
    let inserted: Option<PaymentRow> = sqlx::query_as(&format!(
        "INSERT INTO payments ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, 'captured', $7)
         ON CONFLICT (user_id, idempotency_key) DO NOTHING RETURNING {COLUMNS}"
    ))
    .bind(new_id())
    .bind(&key)
    .bind(&who.user_id)
    .bind(&c.order_id)
    .bind(c.amount_cents)
    .bind(&c.currency)
    .bind(now_rfc3339())
    .fetch_optional(&db)
    .await?;
    if let Some(row) = inserted {
        tracing::info!(payment = %row.0, user = %who.user_id, amount = c.amount_cents, "payment captured");
        // The order shows it is paid. The charge stands either way: a failure here is logged
        // (by `Peers`) and the order can be marked again by a replay of the same key.
        let _ = mark_paid(&peers, &who, &c.order_id).await;
        return Ok((StatusCode::CREATED, Json(payment_json(&row))).into_response());
    }
    let existing: PaymentRow = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM payments WHERE user_id = $1 AND idempotency_key = $2"
    ))
    .bind(&who.user_id)
    .bind(&key)
    .fetch_one(&db)
    .await?;
    let same = existing.2 == who.user_id
        && existing.3 == c.order_id
        && existing.4 == c.amount_cents
        && existing.5 == c.currency;
    if !same {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Idempotency-Key was already used with other parameters",
        ));
    }
    let _ = mark_paid(&peers, &who, &c.order_id).await;
    Ok((
        StatusCode::OK,
        [("idempotent-replayed", "true")],
        Json(payment_json(&existing)),
    )
        .into_response())
}

async fn one(
    State(PaymentService { db, .. }): State<PaymentService>,
    who: Identity,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row: Option<PaymentRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM payments WHERE id = $1"))
            .bind(&id)
            .fetch_optional(&db)
            .await?;
    match row {
        Some(r) if who.may_access(&r.2) => Ok(Json(payment_json(&r))),
        _ => Err(ApiError::not_found("no such payment")),
    }
}
