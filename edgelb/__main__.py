from edgelb.ops.cli import main

raise SystemExit(main())
