"""One module per architecture, each defining `ARCH`; converters.registry discovers them."""
