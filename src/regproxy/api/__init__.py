"""The HTTP surface: the route table (routes.py) and one thin module per resource."""
