"""Network structure and real surgery: the zoo, a user's network, its dependency graph, removal, shrinking, thinning."""
