"""A plain Flower app (ServerApp + ClientApp) that uses fedkd's FedDF strategy as is."""
