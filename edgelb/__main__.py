from edgelb.cli import main

raise SystemExit(main())
