"""Ray actors: learner group, rollout actors, reward deployments, weight sync, controller."""
