//! product-service: a paginated, filterable catalogue and inventory that never goes below zero.

use crate::common::{now_rfc3339, ApiError, ApiJson, ApiQuery, ApiResult, Identity};
use crate::db::{self, Db};
use axum::extract::{Path, State};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS products (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        price_cents BIGINT NOT NULL,
        inventory BIGINT NOT NULL,
        category TEXT NOT NULL,
        updated_at TEXT NOT NULL)"];

/// The demo catalogue, inserted once (every replica tries; the first insert wins).
const CATALOGUE: &[(&str, &str, &str, i64, i64, &str)] = &[
    (
        "p-1001",
        "Trail running shoes",
        "Light shoes with a rock plate",
        11900,
        40,
        "shoes",
    ),
    (
        "p-1002",
        "Road running shoes",
        "Cushioned daily trainer",
        12900,
        25,
        "shoes",
    ),
    (
        "p-1003",
        "Hiking boots",
        "Waterproof leather boots",
        18900,
        12,
        "shoes",
    ),
    (
        "p-2001",
        "Rain jacket",
        "Three-layer waterproof shell",
        21900,
        18,
        "clothing",
    ),
    (
        "p-2002",
        "Merino t-shirt",
        "Odour-resistant base layer",
        5900,
        60,
        "clothing",
    ),
    (
        "p-2003",
        "Down vest",
        "Packable 800-fill vest",
        14900,
        9,
        "clothing",
    ),
    (
        "p-3001",
        "Headlamp",
        "400 lumen, USB rechargeable",
        4900,
        75,
        "gear",
    ),
    (
        "p-3002",
        "Water filter",
        "Squeeze filter, 0.1 micron",
        3900,
        50,
        "gear",
    ),
    (
        "p-3003",
        "Trekking poles",
        "Carbon, folding, pair",
        12900,
        20,
        "gear",
    ),
    (
        "p-3004",
        "Tent, two person",
        "Freestanding, 1.4 kg",
        34900,
        6,
        "gear",
    ),
    (
        "p-3005",
        "Sleeping bag",
        "Down, comfort -5 C",
        29900,
        8,
        "gear",
    ),
    (
        "p-3006",
        "Stove",
        "Canister stove with piezo igniter",
        5900,
        30,
        "gear",
    ),
];

/// Opens the product database and adds the demo catalogue if it is missing.
pub async fn open_db(url: &str) -> anyhow::Result<Db> {
    let db = db::open(url, SCHEMA).await?;
    for (id, name, description, price, inventory, category) in CATALOGUE {
        sqlx::query(
            "INSERT INTO products (id, name, description, price_cents, inventory, category, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
        )
        .bind(*id)
        .bind(*name)
        .bind(*description)
        .bind(*price)
        .bind(*inventory)
        .bind(*category)
        .bind(now_rfc3339())
        .execute(&db)
        .await?;
    }
    Ok(db)
}

/// The product service's routes, on `db`.
pub fn router(db: Db) -> Router {
    Router::new()
        .route("/api/products", get(list))
        .route("/api/products/{id}", get(one))
        .route("/api/products/{id}/inventory", put(inventory))
        .with_state(db)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    page: Option<i64>,
    limit: Option<i64>,
    category: Option<String>,
    search: Option<String>,
}

type ProductRow = (String, String, String, i64, i64, String);

const COLUMNS: &str = "id, name, description, price_cents, inventory, category";

fn product_json(row: ProductRow) -> Value {
    let (id, name, description, price_cents, inventory, category) = row;
    json!({
        "productId": id, "name": name, "description": description,
        "price": price_cents as f64 / 100.0, "priceCents": price_cents,
        "inventory": inventory, "category": category,
    })
}

async fn list(State(db): State<Db>, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult<Json<Value>> {
    let page = q.page.unwrap_or(1);
    let limit = q.limit.unwrap_or(20);
    if !(1..=100_000).contains(&page) {
        return Err(ApiError::bad_request("page: 1 or more"));
    }
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request("limit: 1 to 100"));
    }
    let mut conditions = Vec::new();
    let mut binds = Vec::new();
    if let Some(category) = q.category.filter(|c| !c.is_empty()) {
        if category.len() > 64 {
            return Err(ApiError::bad_request("category: at most 64 characters"));
        }
        binds.push(category);
        conditions.push(format!("category = ${}", binds.len()));
    }
    if let Some(search) = q.search.filter(|s| !s.is_empty()) {
        if search.len() > 100 {
            return Err(ApiError::bad_request("search: at most 100 characters"));
        }
        binds.push(db::like_pattern(&search.to_lowercase()));
        let n = binds.len();
        conditions.push(format!(
            "(LOWER(name) LIKE ${n} ESCAPE '\\' OR LOWER(description) LIKE ${n} ESCAPE '\\')"
        ));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };

    let count_sql = format!("SELECT COUNT(*) FROM products{filter}");
    let mut count = sqlx::query_as::<_, (i64,)>(&count_sql);
    for b in &binds {
        count = count.bind(b.as_str());
    }
    let (total,) = count.fetch_one(&db).await?;

    let list_sql = format!(
        "SELECT {COLUMNS} FROM products{filter} ORDER BY id LIMIT {limit} OFFSET {}",
        (page - 1) * limit
    );
    let mut rows = sqlx::query_as::<_, ProductRow>(&list_sql);
    for b in &binds {
        rows = rows.bind(b.as_str());
    }
    let products: Vec<Value> = rows
        .fetch_all(&db)
        .await?
        .into_iter()
        .map(product_json)
        .collect();
    Ok(Json(json!({
        "products": products,
        "totalCount": total,
        "page": page,
        "limit": limit,
        "totalPages": (total + limit - 1) / limit,
    })))
}

async fn one(State(db): State<Db>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let row: Option<ProductRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM products WHERE id = $1"))
            .bind(&id)
            .fetch_optional(&db)
            .await?;
    row.map(|r| Json(product_json(r)))
        .ok_or_else(|| ApiError::not_found("no such product"))
}

#[derive(Deserialize, Clone, Copy, PartialEq, Debug)]
#[serde(rename_all = "lowercase")]
enum Operation {
    Add,
    Subtract,
    Set,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryChange {
    quantity: i64,
    operation: Operation,
}

/// Largest stock a product can hold, far from any integer overflow.
const MAX_INVENTORY: i64 = 1_000_000_000;

async fn inventory(
    State(db): State<Db>,
    who: Identity,
    Path(id): Path<String>,
    ApiJson(change): ApiJson<InventoryChange>,
) -> ApiResult<Json<Value>> {
    // Checked at the edge too (the gateway's `admins` policy); the service does not rely on it.
    if who.role != "admin" {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "changing the catalogue needs the admin role",
        ));
    }
    if !(0..=MAX_INVENTORY).contains(&change.quantity) {
        return Err(ApiError::bad_request(format!(
            "quantity: 0 to {MAX_INVENTORY}"
        )));
    }
    // One conditional UPDATE each: concurrent changes from any replica cannot drive the stock
    // below zero or above the limit.
    let sql = match change.operation {
        Operation::Add => {
            "UPDATE products SET inventory = inventory + $1, updated_at = $3
             WHERE id = $2 AND inventory + $1 <= 1000000000 RETURNING inventory"
        }
        Operation::Subtract => {
            "UPDATE products SET inventory = inventory - $1, updated_at = $3
             WHERE id = $2 AND inventory >= $1 RETURNING inventory"
        }
        Operation::Set => {
            "UPDATE products SET inventory = $1, updated_at = $3 WHERE id = $2 RETURNING inventory"
        }
    };
    let updated: Option<(i64,)> = sqlx::query_as(sql)
        .bind(change.quantity)
        .bind(&id)
        .bind(now_rfc3339())
        .fetch_optional(&db)
        .await?;
    let Some((new_quantity,)) = updated else {
        let exists: Option<(i64,)> = sqlx::query_as("SELECT inventory FROM products WHERE id = $1")
            .bind(&id)
            .fetch_optional(&db)
            .await?;
        return Err(match exists {
            None => ApiError::not_found("no such product"),
            Some((current,)) => ApiError::new(
                axum::http::StatusCode::CONFLICT,
                format!(
                    "{} of {} would leave the inventory ({current}) out of range",
                    match change.operation {
                        Operation::Add => "adding",
                        _ => "subtracting",
                    },
                    change.quantity
                ),
            ),
        });
    };
    let previous = match change.operation {
        Operation::Add => Some(new_quantity - change.quantity),
        Operation::Subtract => Some(new_quantity + change.quantity),
        Operation::Set => None,
    };
    tracing::info!(product = %id, user = %who.user_id, op = ?change.operation, new_quantity, "inventory changed");
    Ok(Json(json!({
        "productId": id,
        "previousQuantity": previous,
        "newQuantity": new_quantity,
    })))
}
