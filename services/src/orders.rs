//! order-service: a signed-in user creates orders and reads their own. Prices, existence and
//! stock come from the product service, never from the client.

use crate::common::{new_id, now_rfc3339, ApiError, ApiJson, ApiResult, Identity};
use crate::db::{self, Db};
use crate::peers::Peers;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS orders (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        items TEXT NOT NULL,
        total_cents BIGINT NOT NULL,
        currency TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at TEXT NOT NULL)"];

/// Opens the order database.
pub async fn open_db(url: &str) -> anyhow::Result<Db> {
    db::open(url, SCHEMA).await
}

/// The order service's routes, on `db`, pricing orders through the product service.
pub fn router(db: Db, peers: Peers) -> Router {
    Router::new()
        .route("/api/orders", get(list).post(create))
        .route("/api/orders/{id}", get(one))
        // Called by the payment service; the gateway routes nothing under /internal.
        .route("/internal/orders/{id}/paid", axum::routing::put(paid))
        .with_state(OrderService { db, peers })
}

#[derive(Clone)]
struct OrderService {
    db: Db,
    peers: Peers,
}

/// A line of an order as the client asks for it: what and how many, no price.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WantedItem {
    product_id: String,
    quantity: i64,
}

/// A line of an order as recorded, priced from the catalogue.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    product_id: String,
    quantity: i64,
    unit_price_cents: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewOrder {
    items: Vec<WantedItem>,
    #[serde(default = "default_currency")]
    currency: String,
}

fn default_currency() -> String {
    "EUR".into()
}

fn validate(order: &NewOrder) -> Result<(), ApiError> {
    if order.items.is_empty() || order.items.len() > 100 {
        return Err(ApiError::bad_request("items: 1 to 100 required"));
    }
    if order.currency.len() != 3 || !order.currency.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(ApiError::bad_request("currency: a three-letter code"));
    }
    for (i, item) in order.items.iter().enumerate() {
        if item.product_id.is_empty() || item.product_id.len() > 64 {
            return Err(ApiError::bad_request(format!(
                "items[{i}].productId: 1 to 64 characters"
            )));
        }
        if !(1..=1000).contains(&item.quantity) {
            return Err(ApiError::bad_request(format!(
                "items[{i}].quantity: 1 to 1000"
            )));
        }
    }
    Ok(())
}

/// Prices every line from the product service: the product must exist and have the quantity
/// in stock. Returns the priced lines and the total.
async fn price(peers: &Peers, wanted: &[WantedItem]) -> Result<(Vec<Item>, i64), ApiError> {
    let mut items = Vec::with_capacity(wanted.len());
    let mut total: i64 = 0;
    for (i, want) in wanted.iter().enumerate() {
        let url = format!("{}/api/products/{}", peers.products, want.product_id);
        let Some(product) = peers.get("product service", &url, &[]).await? else {
            return Err(ApiError::bad_request(format!(
                "items[{i}].productId: no product `{}`",
                want.product_id
            )));
        };
        let (Some(unit), Some(stock)) = (
            product["priceCents"].as_i64(),
            product["inventory"].as_i64(),
        ) else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "product service answered without a price",
            ));
        };
        if stock < want.quantity {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("items[{i}]: only {stock} of `{}` in stock", want.product_id),
            ));
        }
        total += want.quantity * unit;
        items.push(Item {
            product_id: want.product_id.clone(),
            quantity: want.quantity,
            unit_price_cents: unit,
        });
    }
    Ok((items, total))
}

type OrderRow = (String, String, String, i64, String, String, String);

fn order_json(row: OrderRow) -> Value {
    let (id, user_id, items, total_cents, currency, status, created_at) = row;
    json!({
        "orderId": id, "userId": user_id,
        "items": serde_json::from_str::<Value>(&items).unwrap_or(Value::Null),
        "totalCents": total_cents, "currency": currency, "status": status, "createdAt": created_at,
    })
}

const COLUMNS: &str = "id, user_id, items, total_cents, currency, status, created_at";

async fn create(
    State(s): State<OrderService>,
    who: Identity,
    ApiJson(order): ApiJson<NewOrder>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    validate(&order)?;
    let (items, total) = price(&s.peers, &order.items).await?;
    let id = new_id();
    let items = serde_json::to_string(&items).map_err(anyhow::Error::from)?;
    let row: OrderRow = sqlx::query_as(&format!(
        "INSERT INTO orders ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, 'pending', $6) RETURNING {COLUMNS}"
    ))
    .bind(&id)
    .bind(&who.user_id)
    .bind(items)
    .bind(total)
    .bind(&order.currency)
    .bind(now_rfc3339())
    .fetch_one(&s.db)
    .await?;
    tracing::info!(order = %id, user = %who.user_id, total, "order created");
    Ok((StatusCode::CREATED, Json(order_json(row))))
}

/// Marks the caller's pending order paid (the payment service calls it after a charge).
async fn paid(
    State(OrderService { db, .. }): State<OrderService>,
    who: Identity,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row: Option<OrderRow> = sqlx::query_as(&format!(
        "UPDATE orders SET status = 'paid' WHERE id = $1 AND user_id = $2 RETURNING {COLUMNS}"
    ))
    .bind(&id)
    .bind(&who.user_id)
    .fetch_optional(&db)
    .await?;
    match row {
        Some(r) => Ok(Json(order_json(r))),
        None => Err(ApiError::not_found("no such order")),
    }
}

async fn list(
    State(OrderService { db, .. }): State<OrderService>,
    who: Identity,
) -> ApiResult<Json<Value>> {
    let rows: Vec<OrderRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM orders WHERE user_id = $1 ORDER BY created_at DESC, id LIMIT 100"
    ))
    .bind(&who.user_id)
    .fetch_all(&db)
    .await?;
    let orders: Vec<Value> = rows.into_iter().map(order_json).collect();
    Ok(Json(json!({ "orders": orders })))
}

async fn one(
    State(OrderService { db, .. }): State<OrderService>,
    who: Identity,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row: Option<OrderRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM orders WHERE id = $1"))
            .bind(&id)
            .fetch_optional(&db)
            .await?;
    match row {
        // Someone else's order is answered like a missing one: ids are not probed.
        Some(r) if who.may_access(&r.1) => Ok(Json(order_json(r))),
        _ => Err(ApiError::not_found("no such order")),
    }
}
