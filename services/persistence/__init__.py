"""PostgreSQL persistence: the durable record of sessions, messages, tasks and usage.

Nothing here is on the message path. The worker adds one record per finished task to a Redis
stream (`records.publish_record`); `writer.PersistenceWriter` drains it into PostgreSQL in
batches, idempotently; `history.HistoryStore` reads it back, always scoped by tenant.
"""
