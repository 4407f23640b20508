"""Training loops, tf.distribute strategies, local clusters and their callbacks."""
