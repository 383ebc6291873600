"""The appliance's HTTP API: FastAPI routers over appliance.meta (metadata) and the block
store, assembled by appliance.server.create_app."""
