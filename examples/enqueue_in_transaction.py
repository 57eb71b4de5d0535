"""An application that saves an order and starts its workflow in one transaction.

`orch8.enqueue(conn, ...)` writes the instance with the application's own psycopg
connection, so the instance exists only if the application's transaction commits: no
order without its workflow, no workflow for an order that was never saved. The steps use
built-in handlers, so any node runs them:

    ../.venv/bin/orch8-supervisor --workers 2
    ../.venv/bin/python enqueue_in_transaction.py      # in another terminal
"""

import sys
import uuid

import psycopg

import orch8

ORDERS = """
CREATE TABLE IF NOT EXISTS example_orders (
    id   text PRIMARY KEY,
    item text NOT NULL
)
"""
SAVE_ORDER = "INSERT INTO example_orders (id, item) VALUES (%(id)s, %(item)s)"
ORDER_EXISTS = "SELECT EXISTS (SELECT FROM example_orders WHERE id = %(id)s)"


class PaymentDeclined(Exception):
    pass


def place_order(dsn, item, *, pay):
    """Save the order and start its workflow together; `pay` may raise to undo both."""
    order_id = uuid.uuid4().hex[:8]
    # psycopg: the `with` block is one transaction, committed at its end, rolled back
    # if it raises.
    with psycopg.connect(dsn) as conn:
        conn.execute(SAVE_ORDER, {"id": order_id, "item": item})
        created = orch8.enqueue(conn, "fulfil-order", {"order_id": order_id, "item": item},
                                idempotency_key=f"order-{order_id}")
        pay(order_id)
    return order_id, created.id


def decline(order_id):
    raise PaymentDeclined(order_id)


def main():
    with orch8.Client() as client:
        client.create_sequence("fulfil-order", [
            {"id": "pack", "handler": "noop", "params": {"packed": True}},
            {"id": "ship", "handler": "log",
             "params": {"message": "order {{ input.order_id }}: shipping {{ input.item }}"}},
        ])
        with psycopg.connect(client.dsn, autocommit=True) as conn:
            conn.execute(ORDERS)

        order_id, instance_id = place_order(client.dsn, "a book", pay=lambda order_id: None)
        shipped = client.wait(instance_id)
        print(f"order {order_id} committed: workflow {shipped.state}, "
              f"{shipped.outputs['ship']['message']!r}")

        try:
            place_order(client.dsn, "a lamp", pay=decline)
        except PaymentDeclined as declined:
            rolled_back = declined.args[0]
        with psycopg.connect(client.dsn, autocommit=True) as conn:
            saved = conn.execute(ORDER_EXISTS, {"id": rolled_back}).fetchone()[0]
        started = [i for i in client.list(sequence="fulfil-order", limit=1000)
                   if i.input.get("order_id") == rolled_back]
        print(f"order {rolled_back} rolled back: order saved {saved}, "
              f"workflows started {len(started)}")
        return 0 if shipped.state == orch8.State.COMPLETED and not saved and not started else 1


if __name__ == "__main__":
    sys.exit(main())
