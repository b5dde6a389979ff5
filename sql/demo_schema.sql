-- Demo schema: a small exchange with markets, orders, trades and balances.
-- Every statement can run again on a database that already has the schema.

CREATE TABLE IF NOT EXISTS markets (
    id text PRIMARY KEY,                      -- e.g. 'BTC-USD'
    base text NOT NULL,                       -- currency bought and sold
    quote text NOT NULL,                      -- currency prices are in
    status text NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'halted')),
    tick_size numeric(12, 4) NOT NULL DEFAULT 0.01,
    min_quantity integer NOT NULL DEFAULT 1 CHECK (min_quantity > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    market_id text NOT NULL REFERENCES markets (id),
    user_id bigint NOT NULL,
    side text NOT NULL CHECK (side IN ('buy', 'sell')),
    quantity integer NOT NULL CHECK (quantity > 0),
    price numeric(12, 4),                     -- NULL for market orders
    type text NOT NULL CHECK (type IN ('limit', 'market')),
    status text NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'filled', 'cancelled')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz
);

CREATE INDEX IF NOT EXISTS orders_status_idx ON orders (status);

CREATE TABLE IF NOT EXISTS trades (
    id bigserial PRIMARY KEY,
    market_id text NOT NULL REFERENCES markets (id),
    order_id bigint REFERENCES orders (id) ON DELETE SET NULL,
    buyer_id bigint NOT NULL,
    seller_id bigint NOT NULL,
    quantity integer NOT NULL CHECK (quantity > 0),
    price numeric(12, 4) NOT NULL,
    executed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS user_balances (
    user_id bigint NOT NULL,
    currency text NOT NULL,
    balance numeric NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, currency)
);

-- With REPLICA IDENTITY FULL the WAL carries the whole old row, so an UPDATE
-- event includes the previous status or balance and a DELETE event includes
-- every column, not only the primary key. It costs more WAL per change.
ALTER TABLE orders REPLICA IDENTITY FULL;
ALTER TABLE user_balances REPLICA IDENTITY FULL;
